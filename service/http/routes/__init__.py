"""The routers, one per surface: normalize, stats, models, admin, V2, health."""
