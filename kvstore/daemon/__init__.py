"""The daemon process: configuration, the CLI, the gRPC service and the server that composes the parts."""
