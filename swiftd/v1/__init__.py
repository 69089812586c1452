"""Generated Python code of the swiftd.v1 gRPC API (``python -m swiftd.protogen``; do not edit).

Sources: ``protos/swiftd/v1/*.proto``. Modules: ``common_pb2``, ``gateway_pb2(_grpc)``,
``unet_pb2(_grpc)``, ``controlnet_pb2(_grpc)``, ``lora_store_pb2(_grpc)``.
"""
