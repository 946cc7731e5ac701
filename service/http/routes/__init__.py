"""The routers, one per surface: normalize, stats, admin, V2, health."""
