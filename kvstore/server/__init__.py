"""gRPC servers: the node (KV + Admin servicers over one shard replica) and the router."""
