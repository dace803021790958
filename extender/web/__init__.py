"""The HTTP adapter: kube-scheduler's extender calls in, core decisions out. The only package that imports flask."""
