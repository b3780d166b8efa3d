"""Deployment manifests (KubeRay, Anyscale, container image) and their generator."""
