"""Generated protobuf and gRPC code (see generate.py). Import as `from kvstore.proto import kvstore_pb2`."""
