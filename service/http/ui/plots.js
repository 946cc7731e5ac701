"use strict";
// Hand-written SVG plots for the statistics page: one value per channel as bars, and a
// score over time as a line on a symmetric-log scale. No library: a few paths and labels.
// Each plot is drawn at the pixel size of its box (the viewBox is that size), so labels
// keep their size on any screen; the page draws again when the window is resized.

window.Plots = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const H = 112;
  const LEFT = 42;
  const RIGHT = 6;
  const TOP = 8;
  const BOTTOM = 18;
  const PLOT_H = H - TOP - BOTTOM;
  const LINEAR_UNTIL = 0.01; // the drift scale is linear below this, logarithmic above

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, cls, anchor) {
    const node = el("text", { x, y, class: cls || "tick", "text-anchor": anchor || "end" },
      parent);
    node.textContent = content;
    return node;
  }

  function format(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    const size = Math.abs(value);
    if (size === 0) return "0";
    if (size >= 1e4 || size < 1e-3) return value.toExponential(1).replace("e+", "e");
    if (size >= 100) return value.toFixed(0);
    return Number(value.toPrecision(3)).toString();
  }

  // Clears ``svg`` for a new drawing; returns its width in pixels.
  function reset(svg, label) {
    const width = Math.max(Math.round(svg.parentNode.clientWidth || 320), 160);
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${width} ${H}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    return width;
  }

  function empty(svg, width, message) {
    text(svg, width / 2, H / 2, message, "empty", "middle");
  }

  function extent(values, withZero) {
    let lo = withZero ? 0 : Infinity;
    let hi = withZero ? 0 : -Infinity;
    for (const v of values) {
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (!Number.isFinite(lo)) return null;
    if (hi - lo < 1e-12) {
      const pad = Math.abs(hi) * 0.5 || 1;
      return [lo - (lo < 0 ? pad : 0), hi + pad];
    }
    return [lo, hi];
  }

  // One bar per channel from zero; a single path, however many channels.
  function bars(svg, values, options) {
    const W = reset(svg, options.label);
    const PLOT_W = W - LEFT - RIGHT;
    svg.dataset.count = values ? values.length : 0;
    const range = values && values.length ? extent(values, true) : null;
    if (!range) return empty(svg, W, options.empty || "no data yet");
    const [lo, hi] = range;
    const y = (v) => TOP + ((hi - v) / (hi - lo)) * PLOT_H;
    const step = PLOT_W / values.length;
    const gap = step > 4 ? step * 0.18 : 0;
    const axis = el("g", { class: "axis" }, svg);
    for (const tick of lo < 0 && hi > 0 ? [hi, 0, lo] : [hi, lo]) {
      el("line", { x1: LEFT, x2: W - RIGHT, y1: y(tick), y2: y(tick),
        class: tick === 0 ? "zero" : "grid" }, axis);
      text(axis, LEFT - 4, y(tick) + 3.5, format(tick));
    }
    const zero = y(0);
    let d = "";
    values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const x0 = LEFT + i * step + gap / 2;
      d += `M${x0.toFixed(2)} ${zero.toFixed(2)}V${y(v).toFixed(2)}` +
        `h${(step - gap).toFixed(2)}V${zero.toFixed(2)}Z`;
    });
    el("path", { d, class: `bars ${options.className || ""}` }, svg);
    text(svg, LEFT, H - 4, "0", "tick", "start");
    text(svg, W - RIGHT, H - 4, String(values.length - 1), "tick", "end");
    text(svg, LEFT + PLOT_W / 2, H - 4, options.axis || "channel", "tick", "middle");
    return undefined;
  }

  // The channel under a pointer event over a bars plot, or -1.
  function channelAt(svg, event) {
    const count = Number(svg.dataset.count || 0);
    const box = svg.getBoundingClientRect();
    if (!count || !box.width) return -1;
    const x = event.clientX - box.left - LEFT;
    const i = Math.floor((x / (box.width - LEFT - RIGHT)) * count);
    return i >= 0 && i < count ? i : -1;
  }

  function symlog(v) {
    return Math.log10(1 + Math.max(v, 0) / LINEAR_UNTIL);
  }

  // Scores over time: points [[seconds since the epoch, score], ...], oldest first.
  function line(svg, points, options) {
    const W = reset(svg, options.label);
    const PLOT_W = W - LEFT - RIGHT;
    if (!points || !points.length) return empty(svg, W, options.empty || "no scores yet");
    const now = options.now;
    const first = Math.min(points[0][0], now - 60);
    let top = options.threshold || 0;
    for (const [, v] of points) if (v > top) top = v;
    let ceiling = LINEAR_UNTIL;
    while (ceiling < top) ceiling *= 10;
    const yMax = symlog(ceiling);
    const y = (v) => TOP + (1 - symlog(v) / yMax) * PLOT_H;
    const x = (t) => LEFT + ((t - first) / Math.max(now - first, 1e-9)) * PLOT_W;
    const axis = el("g", { class: "axis" }, svg);
    for (let tick = LINEAR_UNTIL; tick <= ceiling * 1.001; tick *= 10) {
      el("line", { x1: LEFT, x2: W - RIGHT, y1: y(tick), y2: y(tick), class: "grid" }, axis);
      text(axis, LEFT - 4, y(tick) + 3.5, format(tick));
    }
    el("line", { x1: LEFT, x2: W - RIGHT, y1: y(0), y2: y(0), class: "zero" }, axis);
    text(axis, LEFT - 4, y(0) + 3.5, "0");
    const threshold = options.threshold;
    if (threshold) {
      el("line", { x1: LEFT, x2: W - RIGHT, y1: y(threshold), y2: y(threshold),
        class: "threshold" }, svg);
      text(svg, LEFT + 3, y(threshold) - 3, "threshold", "threshold-label", "start");
    }
    const xy = points.map(([t, v]) => `${x(t).toFixed(2)},${y(v).toFixed(2)}`);
    el("polygon", { points: `${x(points[0][0]).toFixed(2)},${y(0).toFixed(2)} ${xy.join(" ")} ` +
      `${x(points[points.length - 1][0]).toFixed(2)},${y(0).toFixed(2)}`, class: "area" }, svg);
    el("polyline", { points: xy.join(" "), class: "trace" }, svg);
    points.forEach(([t, v], i) => {
      const over = threshold && v > threshold;
      if (over || i === points.length - 1) {
        el("circle", { cx: x(t), cy: y(v), r: i === points.length - 1 ? 3 : 2.2,
          class: over ? "dot over" : "dot" }, svg);
      }
    });
    const span = Math.round(now - first);
    text(svg, LEFT, H - 4, span >= 120 ? `−${Math.round(span / 60)} min` : `−${span} s`,
      "tick", "start");
    text(svg, W - RIGHT, H - 4, "now", "tick", "end");
    return undefined;
  }

  return { bars, channelAt, format, line };
})();
