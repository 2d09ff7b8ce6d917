"""Drives a real moed from Debian's python3-grpcio, an independent gRPC implementation.

Run by ctest with /usr/bin/python3; the environment names the binaries and the stub folder.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.environ["MOED_PY_STUBS"])

import grpc  # noqa: E402

# Debian's grpc package has no health module: the generated one lives under the stubs folder.
grpc.__path__.append(os.path.join(os.environ["MOED_PY_STUBS"], "grpc"))
from grpc.health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from moed.v1 import moed_pb2, moed_pb2_grpc  # noqa: E402


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model = os.path.join(cls.tmp.name, "tiny-olmoe")
        subprocess.run([os.environ["MOED_SYNTH_BINARY"], "--arch", "olmoe", "--preset", "tiny",
                        "--out", cls.model], check=True, stdout=subprocess.DEVNULL)
        cls.daemon = subprocess.Popen(
            [os.environ["MOED_BINARY"], "--model", cls.model, "--listen", "127.0.0.1:0", "--http-listen", ""],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = cls.daemon.stdout.readline().strip()
        assert line.startswith("listening on "), line
        cls.address = line[len("listening on "):]
        cls.channel = grpc.insecure_channel(cls.address)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        if cls.daemon.poll() is None:
            cls.daemon.kill()
            cls.daemon.wait()
        cls.tmp.cleanup()

    def test_health_check_and_watch(self):
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", "moed.v1.Moed"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            self.assertEqual(reply.status, health_pb2.HealthCheckResponse.SERVING)
        with self.assertRaises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        self.assertEqual(error.exception.code(), grpc.StatusCode.NOT_FOUND)
        stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = next(stream)
        self.assertEqual(first.status, health_pb2.HealthCheckResponse.SERVING)
        stream.cancel()

    def test_model_info_matches_config_json(self):
        with open(os.path.join(self.model, "config.json")) as f:
            config = json.load(f)
        info = moed_pb2_grpc.MoedStub(self.channel).ModelInfo(moed_pb2.ModelInfoRequest(),
                                                              timeout=10)
        self.assertEqual(info.model_name, "tiny-olmoe")
        self.assertEqual(info.architecture, config["architectures"][0])
        self.assertEqual(info.vocab_size, config["vocab_size"])
        self.assertEqual(info.hidden_size, config["hidden_size"])
        self.assertEqual(info.num_layers, config["num_hidden_layers"])
        self.assertEqual(info.num_key_value_heads, config["num_key_value_heads"])
        self.assertEqual(info.num_experts, config["num_experts"])
        self.assertEqual(info.experts_per_token, config["num_experts_per_tok"])
        self.assertEqual(info.expert_intermediate_size, config["intermediate_size"])
        self.assertEqual(info.max_context_tokens, config["max_position_embeddings"])
        self.assertEqual(list(info.eos_token_ids), [config["eos_token_id"]])
        per_expert = 3 * config["hidden_size"] * config["intermediate_size"] * 2
        self.assertEqual(info.expert_bytes, per_expert)
        self.assertEqual(info.total_expert_bytes,
                         per_expert * config["num_experts"] * config["num_hidden_layers"])
        self.assertTrue(info.has_tokenizer)

    def test_32_concurrent_streams(self):
        import concurrent.futures

        stub = moed_pb2_grpc.MoedStub(self.channel)

        def one(i):
            request = moed_pb2.GenerateRequest(
                prompt_token_ids=[1 + i, 2, 3],
                request_id="py-%d" % i,
                sampling=moed_pb2.SamplingParams(max_tokens=8, temperature=0.7, seed=i, ignore_eos=True))
            ids, last = [], None
            for message in stub.Generate(request, timeout=120):
                self.assertEqual(message.request_id, "py-%d" % i)
                ids.extend(message.token_ids)
                last = message
            return ids, last

        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(one, range(32)))
        self.assertEqual(len(results), 32)
        for ids, last in results:
            self.assertEqual(len(ids), 8)
            self.assertEqual(last.finish_reason, moed_pb2.FINISH_REASON_LENGTH)
            self.assertEqual(last.usage.prompt_tokens, 3)
            self.assertEqual(last.usage.completion_tokens, 8)
        # Same seed, same request: same tokens as when it ran among 31 others.
        again, _ = one(5)
        self.assertEqual(again, results[5][0])

    def test_text_prompt_and_bad_input_status(self):
        stub = moed_pb2_grpc.MoedStub(self.channel)
        messages = list(stub.Generate(moed_pb2.GenerateRequest(
            prompt="the river town", sampling=moed_pb2.SamplingParams(max_tokens=4, temperature=0)), timeout=60))
        self.assertEqual(messages[-1].usage.completion_tokens, 4)
        with self.assertRaises(grpc.RpcError) as error:
            list(stub.Generate(moed_pb2.GenerateRequest(prompt_token_ids=[100000]), timeout=60))
        self.assertEqual(error.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_zz_sigterm_exits_zero(self):
        self.daemon.send_signal(signal.SIGTERM)
        self.assertEqual(self.daemon.wait(timeout=30), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
