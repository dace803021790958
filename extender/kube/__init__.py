"""The Kubernetes adapter: watch, bind, and (later) replace and evict. The only package that imports `kubernetes`."""
