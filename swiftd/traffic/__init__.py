"""Production-shaped traffic: a traffic catalog, a seeded workload generator, an open-loop replayer.

trace.py     the trace file format (JSONL): which GenerateRequest is sent when
catalog.py   a model repository with many LoRAs and ControlNets for the bench model
workload.py  a seeded generator of traces shaped like production text-to-image traffic
loadgen.py   the open-loop load generator: replays a trace against any Gateway-API endpoint
__main__.py  the command line (python -m swiftd.traffic catalog|generate|replay)
"""
