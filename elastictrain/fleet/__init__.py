"""Fleet operations: what a run rented from several providers and regions needs around training.

Placement spread over node labels, cloud preemption notices, provenance and jurisdiction checks,
resume-rate and cost reports, live metrics. Each reads the run's one event stream
(`elastictrain.events`) or the node's own facts; pure parts import no Ray.
"""
