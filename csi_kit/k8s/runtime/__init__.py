"""The Kubernetes runtime every loop stands on: API access, informers, queues, leader election, budgets."""
