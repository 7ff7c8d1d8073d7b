"""KubeRay manifests (k8s/) and the runtime image (Dockerfile), checked against the CRDs and the code. No cluster
and no network are needed, but kustomize is: a standalone `kustomize`, or the one built into `kubectl`.

Each kustomization (k8s/base, k8s/overlays/*) is rendered by kustomize itself (`kustomize build`, else `kubectl
kustomize`: what `kubectl apply -k` applies), so any kustomize feature works, and a kustomization kustomize refuses
fails the tests with its message. kustomize skips a patch whose target matches nothing without a word, so a patch
that changes nothing is an error here. Every rendered object is validated with jsonschema against the ray.io/v1
schema of its KubeRay CRD (OpenAPI 3.0: openapi-schema-validator's `nullable` and formats) in strict mode: fields the
schema does not declare are errors, as with `kubectl apply --validate=strict`. The CRDs come from
tests/data/kuberay-crds, or from the folder named by RAY_VDR_KUBERAY_CRDS. The Dockerfile is read by dockerfile-parse.

The schema cannot check the rest, so the tests below do:
- each entrypoint names a jobs/ script and a config, and its overrides load with ray_vdr's own config loader;
- the jobs of one kustomization agree on the run, bucket and models, and they fit the cluster they bring;
- the RayService runs serving/config.yaml's application, differing only where documented;
- the promote job switches that RayService: it writes the live manifest the endpoint follows, starts from the index
  it serves, and waits for the switch at its Service;
- GPU groups request and tolerate GPUs, and every copy of the cluster spec agrees;
- /dev/shm is sized for the object store;
- one image and one Ray version are used everywhere, equal to pyproject's pin, the Dockerfile's base and the
  installed ray.
The last tests break manifests on purpose (JSON patches applied with jsonpatch, or edits of a string field) and check
that each of these checks notices.
"""
