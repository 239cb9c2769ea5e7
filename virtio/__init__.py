"""virtio: the vhost-user virtio-net device: guest memory, split virtqueues, the vhost-user
protocol and its Trio shell (docs/architecture.md)."""
