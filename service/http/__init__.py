"""The only part that knows FastAPI, Starlette and uvicorn: routes, request
dependencies, middleware, the protocol guard and the table that maps errors to replies."""
