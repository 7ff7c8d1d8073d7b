"""The retrieval endpoint on Ray Serve: the app (ingress, builder), its deployments, plain core and generations."""
