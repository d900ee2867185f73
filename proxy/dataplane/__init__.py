"""The data plane: one request exchange, its legs (protocol adapters), pools, balancing, deadlines."""
