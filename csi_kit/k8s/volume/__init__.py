"""The volume loops: what external-provisioner, -attacher, -resizer and friends do."""
