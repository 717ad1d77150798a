"""The inference service: one engine answering over REST and gRPC."""
