"""moed's /metrics through the Prometheus ecosystem's own tools: promtool's linter, the Python
client's parser, Debian's prometheus scraping a real daemon (with moed's recording rules
loaded), and the Grafana dashboard's queries evaluated by that prometheus.

Expected values come from what the clients saw (usage in responses, finish reasons, ModelInfo),
never from the metrics code. Run by ctest with /usr/bin/python3; the environment names the
binaries, the stub folder and the deploy files.
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.environ["MOED_PY_STUBS"])

import grpc  # noqa: E402
from moed.v1 import moed_pb2, moed_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DEADLINE_SECONDS = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=60):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class PrometheusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = cls.tmp.name
        model = os.path.join(root, "m")
        cls.store = os.path.join(root, "tiny")
        subprocess.run([os.environ["MOED_SYNTH_BINARY"], "--arch", "mixtral", "--preset", "tiny",
                        "--out", model], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([os.environ["MOED_PACK_BINARY"], "--model", model, "--out", cls.store],
                       check=True, stdout=subprocess.DEVNULL)
        # Room for a few of the 16 experts in each tier, so that the tiers hit, miss and evict.
        cls.daemon = subprocess.Popen(
            [os.environ["MOED_BINARY"], "--store", cls.store, "--listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", "--device-cache-bytes", "192K",
             "--host-cache-bytes", "384K"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        grpc_line = cls.daemon.stdout.readline().strip()
        http_line = cls.daemon.stdout.readline().strip()
        assert grpc_line.startswith("listening on "), grpc_line
        assert http_line.startswith("http listening on "), http_line
        cls.grpc_address = grpc_line[len("listening on "):]
        cls.http_address = http_line[len("http listening on "):]
        cls.base = "http://" + cls.http_address
        cls.channel = grpc.insecure_channel(cls.grpc_address)
        cls.stub = moed_pb2_grpc.MoedStub(cls.channel)
        cls.model_name = cls.stub.ModelInfo(moed_pb2.ModelInfoRequest(), timeout=30).model_name
        cls.prometheus = None
        cls.start_prometheus()

    @classmethod
    def start_prometheus(cls):
        config = os.path.join(cls.tmp.name, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {os.environ["MOED_RULES"]}
scrape_configs:
  - job_name: moed
    static_configs:
      - targets: ["{cls.http_address}"]
""")
        # A port picked here could be taken before prometheus binds it: try a few.
        for _ in range(5):
            port = free_port()
            with open(os.path.join(cls.tmp.name, "prometheus.log"), "w") as log:
                cls.prometheus = subprocess.Popen(
                    [os.environ["PROMETHEUS_BINARY"], f"--config.file={config}",
                     f"--storage.tsdb.path={os.path.join(cls.tmp.name, 'tsdb')}",
                     f"--web.listen-address=127.0.0.1:{port}"],
                    stdout=log, stderr=subprocess.STDOUT)
            cls.prom = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + DEADLINE_SECONDS
            while time.monotonic() < deadline and cls.prometheus.poll() is None:
                try:
                    if http("GET", cls.prom + "/-/ready", timeout=2)[0] == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.2)
            cls.prometheus.kill()
            cls.prometheus.wait()
        with open(os.path.join(cls.tmp.name, "prometheus.log")) as f:
            raise RuntimeError("prometheus did not start:\n" + f.read())

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        for process in (cls.prometheus, cls.daemon):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        cls.daemon.stdout.close()
        cls.tmp.cleanup()

    # --- helpers ---------------------------------------------------------------------------

    def scrape(self):
        status, text = http("GET", self.base + "/metrics")
        self.assertEqual(status, 200)
        return text

    def query(self, promql):
        status, body = http("GET", self.prom + "/api/v1/query?" +
                            urllib.parse.urlencode({"query": promql}))
        reply = json.loads(body)
        self.assertEqual(status, 200, body)
        self.assertEqual(reply["status"], "success", body)
        return reply["data"]

    def settled(self, selector, after):
        """The newest scraped value of each series of `selector`, once every one of them has a
        sample scraped after `after` (Unix seconds): {frozenset(labels): value}."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            data = self.query(f"{selector}[30s]")
            series = data["result"]
            if series and all(float(s["values"][-1][0]) > after for s in series):
                out = {}
                for s in series:
                    labels = {k: v for k, v in s["metric"].items()
                              if k not in ("__name__", "instance", "job")}
                    out[frozenset(labels.items())] = float(s["values"][-1][1])
                return out
            if time.monotonic() > deadline:
                self.fail(f"no scrape of {selector} after {after}: {series}")
            time.sleep(0.2)

    def value(self, selector, after, **labels):
        values = self.settled(selector, after)
        want = frozenset({"model_name": self.model_name, **labels}.items())
        matching = [v for k, v in values.items() if want <= k]
        self.assertEqual(len(matching), 1, f"{selector} {labels}: {values}")
        return matching[0]

    def complete(self, prompt_ids, max_tokens):
        status, body = http("POST", self.base + "/v1/completions", {
            "model": self.model_name, "prompt": prompt_ids, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True})
        self.assertEqual(status, 200, body)
        reply = json.loads(body)
        return reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]

    def generate(self, prompt_ids, max_tokens, stop_token_ids=()):
        request = moed_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids,
            sampling=moed_pb2.SamplingParams(max_tokens=max_tokens, temperature=0,
                                             ignore_eos=True, stop_token_ids=stop_token_ids))
        messages = list(self.stub.Generate(request, timeout=60))
        ids = [i for m in messages for i in m.token_ids]
        return messages[-1], ids

    # --- tests -----------------------------------------------------------------------------

    def test_promtool_accepts_the_exposition(self):
        self.complete([1, 2, 3], 2)  # so that every histogram has observations
        result = subprocess.run([os.environ["PROMTOOL_BINARY"], "check", "metrics"],
                                input=self.scrape(), capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stdout + result.stderr, "")

    def test_the_python_client_parser_reads_every_family_with_its_type(self):
        self.complete([4, 5, 6], 3)
        families = {f.name: f for f in text_string_to_metric_families(self.scrape())}
        # The parser names counters without their _total suffix.
        expected = {
            "moed_num_requests_running": "gauge", "moed_num_requests_waiting": "gauge",
            "moed_kv_cache_usage_perc": "gauge", "moed_request_success": "counter",
            "moed_prompt_tokens": "counter", "moed_generation_tokens": "counter",
            "moed_num_preemptions": "counter", "moed_request_errors": "counter",
            "moed_time_to_first_token_seconds": "histogram",
            "moed_inter_token_latency_seconds": "histogram",
            "moed_e2e_request_latency_seconds": "histogram",
            "moed_request_queue_time_seconds": "histogram",
            "moed_request_prompt_tokens": "histogram",
            "moed_request_generation_tokens": "histogram",
            "moed_expert_cache_lookups": "counter", "moed_expert_cache_hits": "counter",
            "moed_expert_cache_ssd_reads": "counter", "moed_expert_cache_ssd_bytes": "counter",
            "moed_expert_cache_staged_bytes": "counter",
            "moed_expert_cache_stage_seconds": "histogram",
            "moed_expert_cache_evictions": "counter", "moed_expert_cache_failed_reads": "counter",
            "moed_expert_cache_stall_seconds": "counter", "moed_expert_cache_resident": "gauge",
            "moed_expert_cache_budget_bytes": "gauge", "moed_build_info": "gauge",
            "moed_model_info": "gauge", "process_resident_memory_bytes": "gauge",
            "process_open_fds": "gauge", "process_cpu_seconds": "counter",
        }
        for name, kind in expected.items():
            self.assertIn(name, families)
            self.assertEqual(families[name].type, kind, name)
        for family in families.values():
            for sample in family.samples:
                self.assertEqual(sample.labels.get("model_name"), self.model_name, sample)
            if family.type == "histogram":
                for labels in {frozenset((k, v) for k, v in s.labels.items() if k != "le")
                               for s in family.samples}:
                    mine = [s for s in family.samples
                            if frozenset((k, v) for k, v in s.labels.items() if k != "le") == labels]
                    buckets = [s for s in mine if s.name.endswith("_bucket")]
                    count = [s.value for s in mine if s.name.endswith("_count")]
                    self.assertEqual(buckets[-1].labels["le"], "+Inf")
                    self.assertEqual(buckets[-1].value, count[0])
                    values = [b.value for b in buckets]
                    self.assertEqual(values, sorted(values), "buckets are cumulative")
        info = families["moed_model_info"].samples[0].labels
        self.assertEqual(info["architecture"], "MixtralForCausalLM")
        self.assertEqual(info["num_experts"], "8")

    def test_prometheus_reads_back_what_the_requests_did(self):
        requests_start = time.time()
        # Baselines, so that other tests' requests do not matter.
        tokens_before = self.value("moed_generation_tokens_total", requests_start)
        stop_before = self.value("moed_request_success_total", requests_start,
                                 finished_reason="stop")
        length_before = self.value("moed_request_success_total", requests_start,
                                   finished_reason="length")
        abort_before = self.value("moed_request_success_total", requests_start,
                                  finished_reason="abort")
        ttft_before = self.value("moed_time_to_first_token_seconds_count", requests_start)

        generated = 0
        for i, max_tokens in enumerate([3, 5, 8, 2]):
            reason, tokens = self.complete([10 + i, 20, 30], max_tokens)
            self.assertEqual(reason, "length")
            generated += tokens
        last, ids = self.generate([7, 8, 9], 10)
        self.assertEqual(last.finish_reason, moed_pb2.FINISH_REASON_LENGTH)
        generated += last.usage.completion_tokens
        last, _ = self.generate([7, 8, 9], 10, stop_token_ids=[ids[3]])
        self.assertEqual(last.finish_reason, moed_pb2.FINISH_REASON_STOP)
        generated += last.usage.completion_tokens
        requests_end = time.time()

        self.assertEqual(self.value("moed_generation_tokens_total", requests_end) - tokens_before,
                         generated)
        self.assertEqual(self.value("moed_request_success_total", requests_end,
                                    finished_reason="length") - length_before, 5)
        self.assertEqual(self.value("moed_request_success_total", requests_end,
                                    finished_reason="stop") - stop_before, 1)
        self.assertEqual(self.value("moed_time_to_first_token_seconds_count", requests_end)
                         - ttft_before, 6)

        # The expert cache's counters against ModelInfo's, with nothing running in between.
        quiet = time.time()
        cache = self.stub.ModelInfo(moed_pb2.ModelInfoRequest(), timeout=30).expert_cache
        hits = self.settled("moed_expert_cache_hits_total", quiet)
        lookups = self.settled("moed_expert_cache_lookups_total", quiet)

        def tier(values, name):
            return values[frozenset({"model_name": self.model_name, "tier": name}.items())]
        self.assertGreater(cache.device_hits, 0)
        self.assertGreater(cache.ssd_reads, 0)
        self.assertEqual(tier(hits, "device"), cache.device_hits)
        self.assertEqual(tier(hits, "host"), cache.host_hits)
        self.assertEqual(tier(lookups, "device") - tier(hits, "device"), cache.device_misses)
        self.assertEqual(self.value("moed_expert_cache_ssd_reads_total", quiet), cache.ssd_reads)
        self.assertEqual(self.value("moed_expert_cache_ssd_bytes_total", quiet), cache.ssd_bytes)
        self.assertEqual(sum(self.settled("moed_expert_cache_evictions_total", quiet).values()),
                         cache.evictions)
        self.assertEqual(sum(self.settled("moed_expert_cache_failed_reads_total",
                                          quiet).values()), cache.failed_reads)
        self.assertEqual(self.value("moed_expert_cache_budget_bytes", quiet, tier="device"),
                         cache.device_budget_bytes)
        self.assertEqual(self.value("moed_expert_cache_resident", quiet, tier="host"),
                         cache.host_resident)

        # A client that leaves mid-stream is an abort; refused requests are errors by code.
        # The series appears with the first error: read the baseline straight from /metrics.
        errors_before = sum(
            sample.value for family in text_string_to_metric_families(self.scrape())
            for sample in family.samples
            if sample.name == "moed_request_errors_total"
            and sample.labels.get("code") == "invalid_argument")
        stream = self.stub.Generate(moed_pb2.GenerateRequest(
            prompt_token_ids=[1, 2], sampling=moed_pb2.SamplingParams(
                max_tokens=250, temperature=0, ignore_eos=True)), timeout=60)
        next(stream)
        stream.cancel()
        status, _ = http("POST", self.base + "/v1/completions", b"{not json")
        self.assertEqual(status, 400)
        status, _ = http("POST", self.base + "/v1/completions", {
            "model": self.model_name, "prompt": [1] * 5000, "max_tokens": 1})
        self.assertEqual(status, 400)
        # The cancelled stream ends at the scheduler's next step: wait for it, with a deadline.
        deadline = time.monotonic() + DEADLINE_SECONDS
        while self.value("moed_request_success_total", time.time(),
                         finished_reason="abort") - abort_before < 1:
            self.assertLess(time.monotonic(), deadline, "the cancelled stream never ended")
            time.sleep(0.2)
        after = time.time()
        self.assertEqual(self.value("moed_request_success_total", after,
                                    finished_reason="abort") - abort_before, 1)
        self.assertEqual(self.value('moed_request_errors_total', after, code="invalid_argument")
                         - errors_before, 2)
        # The recording rules run on these series.
        rate = self.query("moed:generation_tokens:rate5m")["result"]
        self.assertEqual(len(rate), 1)
        self.assertGreater(float(rate[0]["value"][1]), 0)

    def test_metrics_false_serves_no_endpoint_and_requests_still_work(self):
        daemon = subprocess.Popen(
            [os.environ["MOED_BINARY"], "--store", self.store, "--listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", "--metrics", "false"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            daemon.stdout.readline()
            base = "http://" + daemon.stdout.readline().strip()[len("http listening on "):]
            self.assertEqual(http("GET", base + "/metrics")[0], 404)
            status, body = http("POST", base + "/v1/completions", {
                "model": self.model_name, "prompt": [1, 2], "max_tokens": 3, "ignore_eos": True})
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 3)
            self.assertEqual(http("GET", base + "/health")[0], 200)
        finally:
            daemon.kill()
            daemon.wait()
            daemon.stdout.close()

    def test_the_dashboard_queries_only_exported_metrics_and_each_returns_data(self):
        for i in range(3):
            self.complete([40 + i, 41, 42], 4)
        http("POST", self.base + "/v1/completions", b"{not json")  # an error series
        scraped = set()
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                scraped.add(sample.name)
        with open(os.environ["MOED_DASHBOARD"]) as f:
            dashboard = json.load(f)
        exprs = []

        def walk(node):
            if isinstance(node, dict):
                if isinstance(node.get("expr"), str):
                    exprs.append(node["expr"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)
        walk(dashboard)
        self.assertGreater(len(exprs), 20)
        variable = dashboard["templating"]["list"][1]["query"]["query"]
        exprs.append(variable[len("label_values("):].split(",")[0])
        # Metric names: identifiers not followed by "(" (functions), outside {...} (labels),
        # outside by (...) and not PromQL keywords.
        keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                    "unless", "offset", "bool", "inf", "nan"}
        for expr in exprs:
            stripped = re.sub(r"\{[^}]*\}", "", expr)
            stripped = re.sub(r"\b(by|without)\s*\([^)]*\)", "", stripped)
            stripped = re.sub(r"\[[^\]]*\]", "", stripped)
            names = [m.group(1) for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", stripped)
                     if m.group(2) is None and m.group(1) not in keywords]
            self.assertTrue(names, expr)
            for name in names:
                self.assertIn(name, scraped, f"{name} in {expr}")
        # Every query, with Grafana's variables filled in, is valid PromQL and finds data.
        time.sleep(3)  # a few scrapes of the requests above
        self.settled("moed_generation_tokens_total", time.time())
        for expr in exprs[:-1]:
            promql = (expr.replace("$model_name", ".*").replace("$__rate_interval", "1m"))
            result = self.query(promql)["result"]
            self.assertTrue(result, f"no data for {promql}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
