"""Fleet mode: several replicas share their rollouts through Redis (`fleet:` in the config).

- `connection`: the Redis client from the URL, reconnect backoff, one log line per state change;
- `keys`: every key we write, and the Lua scripts that write the state atomically;
- `lease`: leader election with a fencing token;
- `evidence`: pushing per-second slices and merging the fleet's window;
- `store`: the controller's seams (observations, decider gate, state store) backed by Redis;
- `member`: the loop that ties them together in one replica; `report`: /status and /metrics.

Nothing on the data plane's path touches Redis: requests never wait for it or fail because of it.
"""
