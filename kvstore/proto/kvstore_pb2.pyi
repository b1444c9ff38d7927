from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRONG: _ClassVar[Consistency]
    SESSION: _ClassVar[Consistency]
    BOUNDED: _ClassVar[Consistency]
    EVENTUAL: _ClassVar[Consistency]
STRONG: Consistency
SESSION: Consistency
BOUNDED: Consistency
EVENTUAL: Consistency

class ReadOptions(_message.Message):
    __slots__ = ("consistency", "session", "max_staleness_seconds")
    class SessionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    consistency: Consistency
    session: _containers.ScalarMap[int, int]
    max_staleness_seconds: float
    def __init__(self, consistency: _Optional[_Union[Consistency, str]] = ..., session: _Optional[_Mapping[int, int]] = ..., max_staleness_seconds: _Optional[float] = ...) -> None: ...

class ResponseHeader(_message.Message):
    __slots__ = ("shard", "revision", "term", "epoch", "served_by", "revisions", "leader")
    class RevisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    shard: int
    revision: int
    term: int
    epoch: int
    served_by: str
    revisions: _containers.ScalarMap[int, int]
    leader: str
    def __init__(self, shard: _Optional[int] = ..., revision: _Optional[int] = ..., term: _Optional[int] = ..., epoch: _Optional[int] = ..., served_by: _Optional[str] = ..., revisions: _Optional[_Mapping[int, int]] = ..., leader: _Optional[str] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    revision: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., revision: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "request_id", "epoch", "retry")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    request_id: bytes
    epoch: int
    retry: bool
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., request_id: _Optional[bytes] = ..., epoch: _Optional[int] = ..., retry: bool = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "read", "epoch")
    KEY_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    read: ReadOptions
    epoch: int
    def __init__(self, key: _Optional[bytes] = ..., read: _Optional[_Union[ReadOptions, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "found", "kv")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    found: bool
    kv: KeyValue
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., found: bool = ..., kv: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys", "request_id", "epoch", "non_atomic", "retry")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NON_ATOMIC_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    request_id: bytes
    epoch: int
    non_atomic: bool
    retry: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., request_id: _Optional[bytes] = ..., epoch: _Optional[int] = ..., non_atomic: bool = ..., retry: bool = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("header", "deleted")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    deleted: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., deleted: _Optional[int] = ...) -> None: ...

class MultiPutRequest(_message.Message):
    __slots__ = ("keys", "values", "request_id", "epoch", "non_atomic", "retry")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NON_ATOMIC_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    request_id: bytes
    epoch: int
    non_atomic: bool
    retry: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., request_id: _Optional[bytes] = ..., epoch: _Optional[int] = ..., non_atomic: bool = ..., retry: bool = ...) -> None: ...

class MultiPutResponse(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class MultiGetRequest(_message.Message):
    __slots__ = ("keys", "read", "epoch")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    read: ReadOptions
    epoch: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., read: _Optional[_Union[ReadOptions, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class MultiGetResponse(_message.Message):
    __slots__ = ("header", "keys", "values", "revisions")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    revisions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., revisions: _Optional[_Iterable[int]] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("start", "end", "prefix", "limit", "continuation", "read", "epoch")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    start: bytes
    end: bytes
    prefix: bytes
    limit: int
    continuation: bytes
    read: ReadOptions
    epoch: int
    def __init__(self, start: _Optional[bytes] = ..., end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ..., limit: _Optional[int] = ..., continuation: _Optional[bytes] = ..., read: _Optional[_Union[ReadOptions, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("header", "kvs", "continuation")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KVS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    kvs: _containers.RepeatedCompositeFieldContainer[KeyValue]
    continuation: bytes
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., kvs: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., continuation: _Optional[bytes] = ...) -> None: ...

class CompareAndSetRequest(_message.Message):
    __slots__ = ("key", "value", "expected_revision", "request_id", "epoch", "retry")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    expected_revision: int
    request_id: bytes
    epoch: int
    retry: bool
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expected_revision: _Optional[int] = ..., request_id: _Optional[bytes] = ..., epoch: _Optional[int] = ..., retry: bool = ...) -> None: ...

class CompareAndSetResponse(_message.Message):
    __slots__ = ("header", "succeeded", "current")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    succeeded: bool
    current: KeyValue
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., succeeded: bool = ..., current: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("put", "get", "delete", "compare_and_set", "multi_put", "multi_get")
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_AND_SET_FIELD_NUMBER: _ClassVar[int]
    MULTI_PUT_FIELD_NUMBER: _ClassVar[int]
    MULTI_GET_FIELD_NUMBER: _ClassVar[int]
    put: PutRequest
    get: GetRequest
    delete: DeleteRequest
    compare_and_set: CompareAndSetRequest
    multi_put: MultiPutRequest
    multi_get: MultiGetRequest
    def __init__(self, put: _Optional[_Union[PutRequest, _Mapping]] = ..., get: _Optional[_Union[GetRequest, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., compare_and_set: _Optional[_Union[CompareAndSetRequest, _Mapping]] = ..., multi_put: _Optional[_Union[MultiPutRequest, _Mapping]] = ..., multi_get: _Optional[_Union[MultiGetRequest, _Mapping]] = ...) -> None: ...

class OpError(_message.Message):
    __slots__ = ("code", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("put", "get", "delete", "compare_and_set", "multi_put", "multi_get", "error")
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_AND_SET_FIELD_NUMBER: _ClassVar[int]
    MULTI_PUT_FIELD_NUMBER: _ClassVar[int]
    MULTI_GET_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    put: PutResponse
    get: GetResponse
    delete: DeleteResponse
    compare_and_set: CompareAndSetResponse
    multi_put: MultiPutResponse
    multi_get: MultiGetResponse
    error: OpError
    def __init__(self, put: _Optional[_Union[PutResponse, _Mapping]] = ..., get: _Optional[_Union[GetResponse, _Mapping]] = ..., delete: _Optional[_Union[DeleteResponse, _Mapping]] = ..., compare_and_set: _Optional[_Union[CompareAndSetResponse, _Mapping]] = ..., multi_put: _Optional[_Union[MultiPutResponse, _Mapping]] = ..., multi_get: _Optional[_Union[MultiGetResponse, _Mapping]] = ..., error: _Optional[_Union[OpError, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[BatchOp]
    def __init__(self, ops: _Optional[_Iterable[_Union[BatchOp, _Mapping]]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "shard", "role", "term", "leader", "leader_address", "commit_index", "applied_index", "leader_commit_index", "staleness_seconds", "epoch", "key_count", "address", "zone", "raft_log_size", "health", "pid", "cluster_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    RAFT_LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    node: str
    shard: int
    role: str
    term: int
    leader: str
    leader_address: str
    commit_index: int
    applied_index: int
    leader_commit_index: int
    staleness_seconds: float
    epoch: int
    key_count: int
    address: str
    zone: str
    raft_log_size: int
    health: str
    pid: int
    cluster_id: str
    def __init__(self, node: _Optional[str] = ..., shard: _Optional[int] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader: _Optional[str] = ..., leader_address: _Optional[str] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., leader_commit_index: _Optional[int] = ..., staleness_seconds: _Optional[float] = ..., epoch: _Optional[int] = ..., key_count: _Optional[int] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., raft_log_size: _Optional[int] = ..., health: _Optional[str] = ..., pid: _Optional[int] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("name", "address", "raft_address", "zone")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    raft_address: str
    zone: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., raft_address: _Optional[str] = ..., zone: _Optional[str] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("id", "replicas")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    id: int
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, id: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class ClusterMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterMapResponse(_message.Message):
    __slots__ = ("epoch", "vnodes_per_shard", "shards", "cluster_id", "slots", "ring_shards", "meta")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VNODES_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    vnodes_per_shard: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    cluster_id: str
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    ring_shards: _containers.RepeatedScalarFieldContainer[int]
    meta: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, epoch: _Optional[int] = ..., vnodes_per_shard: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., cluster_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., ring_shards: _Optional[_Iterable[int]] = ..., meta: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class SlotRange(_message.Message):
    __slots__ = ("first", "last", "shard")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    shard: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("shard", "chunk_bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    chunk_bytes: int
    def __init__(self, shard: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("header", "data", "done", "size", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    data: bytes
    done: bool
    size: int
    sha256: str
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., done: bool = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class MoveClaimRequest(_message.Message):
    __slots__ = ("shard", "move", "ranges", "side", "phase", "epoch")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard: int
    move: int
    ranges: _containers.RepeatedCompositeFieldContainer[SlotRange]
    side: str
    phase: str
    epoch: int
    def __init__(self, shard: _Optional[int] = ..., move: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., side: _Optional[str] = ..., phase: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class MoveClaimResponse(_message.Message):
    __slots__ = ("header", "imported_through")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    imported_through: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., imported_through: _Optional[int] = ...) -> None: ...

class ExportKeysRequest(_message.Message):
    __slots__ = ("shard", "move", "resume", "after_slot", "after_key", "limit")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SLOT_FIELD_NUMBER: _ClassVar[int]
    AFTER_KEY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    shard: int
    move: int
    resume: bool
    after_slot: int
    after_key: bytes
    limit: int
    def __init__(self, shard: _Optional[int] = ..., move: _Optional[int] = ..., resume: bool = ..., after_slot: _Optional[int] = ..., after_key: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ExportKeysResponse(_message.Message):
    __slots__ = ("header", "keys", "values", "done", "next_slot", "next_key")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    NEXT_SLOT_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    done: bool
    next_slot: int
    next_key: bytes
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., done: bool = ..., next_slot: _Optional[int] = ..., next_key: _Optional[bytes] = ...) -> None: ...

class ExportChangesRequest(_message.Message):
    __slots__ = ("shard", "move", "after_revision", "limit")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    shard: int
    move: int
    after_revision: int
    limit: int
    def __init__(self, shard: _Optional[int] = ..., move: _Optional[int] = ..., after_revision: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ExportChangesResponse(_message.Message):
    __slots__ = ("header", "keys", "values", "deleted", "revisions")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    revisions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., deleted: _Optional[_Iterable[bool]] = ..., revisions: _Optional[_Iterable[int]] = ...) -> None: ...

class ImportChangesRequest(_message.Message):
    __slots__ = ("shard", "move", "keys", "values", "deleted", "through")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    THROUGH_FIELD_NUMBER: _ClassVar[int]
    shard: int
    move: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    through: int
    def __init__(self, shard: _Optional[int] = ..., move: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., deleted: _Optional[_Iterable[bool]] = ..., through: _Optional[int] = ...) -> None: ...

class ImportChangesResponse(_message.Message):
    __slots__ = ("header", "imported_through")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    imported_through: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., imported_through: _Optional[int] = ...) -> None: ...

class DropMovedRequest(_message.Message):
    __slots__ = ("shard", "move", "limit")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    shard: int
    move: int
    limit: int
    def __init__(self, shard: _Optional[int] = ..., move: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class DropMovedResponse(_message.Message):
    __slots__ = ("header", "keys", "changes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    keys: int
    changes: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., keys: _Optional[int] = ..., changes: _Optional[int] = ...) -> None: ...
