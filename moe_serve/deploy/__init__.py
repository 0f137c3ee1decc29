"""`moe-serve deploy render`: Kubernetes manifests and a docker-compose file from a placement.

Modules: spec (shards, names, each service's command, settings, ports and health checks — shared by both
targets), k8s and k8s_policy (the kustomize base), compose, yamlout (deterministic YAML), cli.
"""
