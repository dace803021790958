"""migchain: a kube-scheduler extender that lets MIG pods borrow larger free slices along admin-defined chains."""

__version__ = "0.1.0"
