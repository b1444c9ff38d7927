"""The Batch RPC's ops, read from the proto: for each `BatchOp` field, the KV method that serves it
alone (its request type) and the `BatchResult` field of its answer (the same name, that method's
response type). The client's pipeline and the servers' batch fan-out both use these tables, so a
batchable method is added in proto/kvstore.proto alone."""

from __future__ import annotations

from kvstore.proto import kvstore_pb2 as pb


def _field_by_method() -> dict[str, str]:
    kv = pb.DESCRIPTOR.services_by_name["KV"]
    method_by_request = {m.input_type.full_name: m for m in kv.methods}
    answers = {f.name: f for f in pb.BatchResult.DESCRIPTOR.oneofs_by_name["result"].fields}
    table: dict[str, str] = {}
    for op in pb.BatchOp.DESCRIPTOR.oneofs_by_name["op"].fields:
        method = method_by_request.get(op.message_type.full_name)
        answer = answers.get(op.name)
        if method is None or answer is None or answer.message_type.full_name != method.output_type.full_name:
            raise RuntimeError(
                f"BatchOp.{op.name} has no KV method, or no BatchResult.{op.name} of its answer"
            )
        table[method.name] = op.name
    return table


#: KV method -> its field in BatchOp and BatchResult ("CompareAndSet" -> "compare_and_set").
FIELD_BY_METHOD: dict[str, str] = _field_by_method()
#: BatchOp field -> the KV method that serves it alone.
METHOD_BY_FIELD: dict[str, str] = {field: method for method, field in FIELD_BY_METHOD.items()}
