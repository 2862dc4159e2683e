import msgpack

from tokenmill.engine.request import EngineCoreRequest
from tokenmill.sampling_params import SamplingParams


def test_engine_core_request_round_trips_through_msgpack():
    req = EngineCoreRequest("r1", [1, 2, 3], SamplingParams(n=2, seed=4, stop=["x"], logit_bias={7: -3.5}, max_tokens=None),
                            priority=2, arrival_time=12.5, eos_token_ids=[2])
    back = EngineCoreRequest.from_wire(msgpack.unpackb(msgpack.packb(req.to_wire())))
    assert back == req and back.params.logit_bias == {7: -3.5}
