"""The retrieval endpoint on Ray Serve: the app (ingress, builder), its deployments, their plain core and generations."""
