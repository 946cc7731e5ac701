"use strict";
// The statistics page: polls /stats and draws every layer's running statistics (or, for
// layers without them, the average of their inputs' statistics) and its drift over time.
// With protected reads it asks for the token once and keeps it in this tab's
// sessionStorage, sending it as a bearer header to this server only.

(() => {
  const TOKEN = "normcore.token";
  const { bars, channelAt, format, line } = window.Plots;
  const state = { config: { protect_reads: false, refresh_ms: 1000 }, cards: new Map(),
    timer: 0 };
  const $ = (id) => document.getElementById(id);

  function make(tag, className, parent, content) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = content;
    if (parent) parent.appendChild(node);
    return node;
  }

  // --- the token ----------------------------------------------------------------------

  const token = () => sessionStorage.getItem(TOKEN) || "";
  const headers = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

  function askToken(message) {
    clearTimeout(state.timer);
    state.cards.clear();
    $("layers").replaceChildren();
    $("toolbar").hidden = true;
    $("server").textContent = "";
    $("login").hidden = false;
    $("forget").hidden = true;
    $("login-error").textContent = message;
    setLive("locked", "token needed");
    $("token").focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN, value);
    $("token").value = "";
    $("login").hidden = true;
    poll();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN);
    askToken("");
  });

  // --- polling ------------------------------------------------------------------------

  function setLive(status, label) {
    const live = $("live");
    live.dataset.state = status;
    live.textContent = label;
  }

  function showError(message) {
    $("error").hidden = !message;
    $("error").textContent = message;
  }

  async function poll() {
    clearTimeout(state.timer);
    try {
      const reply = await fetch("stats", { headers: headers(), cache: "no-store" });
      if (reply.status === 401 || reply.status === 403) {
        sessionStorage.removeItem(TOKEN);
        askToken(reply.status === 403 ? "The server refused that token." : "");
        return;
      }
      if (!reply.ok) throw new Error(`/stats answered ${reply.status}`);
      render(await reply.json());
      $("forget").hidden = !token();
      showError("");
      setLive("live", "live");
    } catch (err) {
      setLive("down", "reconnecting");
      showError(`Cannot read the statistics (${err.message}); trying again.`);
    }
    const every = state.config.refresh_ms || 1000;
    state.timer = setTimeout(poll, document.hidden ? every * 10 : every);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && $("login").hidden) poll();
  });

  // --- rendering ----------------------------------------------------------------------

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} d ago`;
  }

  function duration(seconds) {
    return ago(seconds).replace(" ago", "").replace("just now", "0 s");
  }

  function render(data) {
    state.last = data;
    const server = data.server;
    const now = server.time || Date.now() / 1000;
    $("toolbar").hidden = false;
    $("server").textContent = `${server.layers} layers · ${server.requests.eval} eval · ` +
      `${server.requests.train} train · up ${duration(server.uptime_seconds)} · ` +
      `${server.persistence}`;
    const grid = $("layers");
    for (const [name, card] of state.cards) {
      if (!(name in data.layers)) {
        card.root.remove();
        state.cards.delete(name);
      }
    }
    Object.keys(data.layers).sort().forEach((name, i) => {
      let card = state.cards.get(name);
      if (!card) {
        card = createCard(name);
        state.cards.set(name, card);
      }
      if (grid.children[i] !== card.root) grid.insertBefore(card.root, grid.children[i] || null);
      update(card, data.layers[name], now);
    });
    filter();
  }

  function figure(card, parent, key) {
    const root = make("figure", `plot ${key}`, parent);
    const caption = make("figcaption", "", root);
    const title = make("span", "title", caption);
    const hover = make("output", "hover", caption);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    root.appendChild(svg);
    if (key !== "drift") {
      const show = (event) => {
        const i = channelAt(svg, event);
        const values = card.values[key];
        hover.textContent = i < 0 || !values ? "" : `${card.unit} ${i}: ${format(values[i])}`;
      };
      svg.addEventListener("pointermove", show);
      svg.addEventListener("pointerdown", show);
      svg.addEventListener("pointerleave", () => { hover.textContent = ""; });
    }
    return { title, svg };
  }

  function createCard(name) {
    const root = make("article", "card");
    root.dataset.layer = name;
    const head = make("header", "", root);
    make("h2", "", head, name);
    const kind = make("span", "kind", head);
    const device = make("span", "device", head);
    const facts = make("dl", "facts", root);
    const fact = (label, className) => {
      const item = make("div", className, facts);
      make("dt", "", item, label);
      return make("dd", "", item);
    };
    const card = {
      name, root, kind, device, values: {}, unit: "channel", plotted: "",
      evals: fact("eval", "evals"), trains: fact("train", "trains"),
      batches: fact("batches tracked", "batches"), updated: fact("last update", "updated"),
    };
    const summary = make("div", "drift-summary", root);
    card.badge = make("span", "badge", summary);
    card.driftText = make("span", "drift-text", summary);
    card.moved = make("p", "moved", root);
    const plots = make("div", "plots", root);
    card.mean = figure(card, plots, "mean");
    card.var = figure(card, plots, "var");
    card.drift = figure(card, plots, "drift");
    return card;
  }

  function unitOf(kind) {
    if (kind === "LayerNorm" || kind === "RMSNorm") return "feature";
    if (kind === "GroupNorm") return "group";
    return "channel";
  }

  function update(card, entry, now) {
    const drift = entry.drift;
    card.kind.textContent = entry.kind;
    card.device.textContent = entry.device;
    card.evals.textContent = entry.requests.eval;
    card.trains.textContent = entry.requests.train;
    card.batches.textContent = entry.num_batches_tracked ?? "–";
    card.batches.parentElement.hidden = entry.num_batches_tracked === null;
    card.updated.textContent = entry.last_update
      ? ago(now - Date.parse(entry.last_update) / 1000) : "never";
    const running = drift.reference === "running";
    card.unit = running ? "channel" : unitOf(entry.kind);
    updateDrift(card, drift);
    const mean = running ? entry.running_mean : drift.reference_mean;
    const variance = running ? entry.running_var : drift.reference_var;
    card.mean.title.textContent = running ? "running mean" : "input mean (average)";
    card.var.title.textContent = running ? "running variance" : "input variance (average)";
    const key = JSON.stringify([mean, variance, entry.summarized]);
    if (key !== card.plotted) {
      card.plotted = key;
      card.values = { mean, var: variance };
      const none = entry.summarized ? `too wide to draw here: see stats/${card.name}`
        : running ? "no statistics" : "no eval inputs yet";
      bars(card.mean.svg, mean, { label: card.mean.title.textContent, className: "mean",
        axis: card.unit, empty: none });
      bars(card.var.svg, variance, { label: card.var.title.textContent, className: "var",
        axis: card.unit, empty: none });
    }
    card.drift.title.textContent = drift.threshold
      ? `drift score over time (threshold ${format(drift.threshold)})` : "drift score over time";
    line(card.drift.svg, drift.history, { now, threshold: drift.threshold,
      label: card.drift.title.textContent,
      empty: running ? "no eval batches yet" : "no scores yet: the first batch is the reference" });
  }

  function updateDrift(card, drift) {
    const score = drift.score;
    let level = "none";
    if (score !== null) {
      if (drift.threshold) level = score > drift.threshold ? "high" : "ok";
      else level = score >= 1 ? "high" : score >= 0.25 ? "warn" : "ok";
    }
    card.badge.dataset.level = level;
    card.badge.textContent = score === null ? "drift –" : `drift ${format(score)}`;
    const parts = [];
    if (drift.ema !== null) parts.push(`avg ${format(drift.ema)}`);
    if (drift.max !== null) parts.push(`max ${format(drift.max)}`);
    parts.push(`${drift.scored} scored`);
    if (drift.threshold) {
      parts.push(`${drift.crossings} crossing${drift.crossings === 1 ? "" : "s"}`);
    }
    if (drift.reference === "inputs") parts.push(`vs ${drift.reference_batches} inputs`);
    card.driftText.textContent = parts.join(" · ");
    card.moved.textContent = drift.channels.length
      ? `moved most: ${drift.channels.map((c) => `${card.unit} ${c.channel} ` +
        `(${format(c.score)})`).join(", ")}`
      : "";
  }

  function filter() {
    const words = $("filter").value.trim().toLowerCase();
    for (const [name, card] of state.cards) {
      card.root.hidden = Boolean(words) && !name.toLowerCase().includes(words);
    }
  }

  $("filter").addEventListener("input", filter);

  let resizing = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const card of state.cards.values()) card.plotted = "";
      if (state.last) render(state.last);
    }, 150);
  });

  async function start() {
    try {
      const reply = await fetch("ui/config.json", { cache: "no-store" });
      if (reply.ok) state.config = await reply.json();
    } catch (err) {
      showError(`Cannot reach the server (${err.message}).`);
    }
    if (state.config.protect_reads && !token()) askToken("");
    else poll();
  }

  start();
})();
