"""The HTTP layer both web apps stand on (api.py: errors, the bounded JSON reader, the handlers, the bearer check;
launch.py: uvicorn), the key-file reader (keys.py) and the one client that calls a nextbit server (client.py)."""
