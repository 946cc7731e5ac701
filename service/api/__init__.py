"""HTTP routers, one per surface."""
