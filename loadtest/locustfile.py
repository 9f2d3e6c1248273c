"""Locust kit for a KServe v2 endpoint: the gateway, or one Triton server directly.

Two users, both driven by the same traffic profile (loadtest/profile.yaml):

* :class:`TritonUser` speaks through ``tritonclient.http`` (the sync client, which runs on
  gevent like Locust itself) with binary tensors, as production Triton clients do.
* :class:`KServeHttpUser` posts KServe v2 JSON with Locust's FastHttpUser.

Each request picks a model, a tenant (``Authorization: Bearer <key>``) and a priority
(``X-Priority``) by weight. Rejections (429, 503, 504) are failures whose error reads
``HTTP 429 Too Many Requests`` …, so the failures CSV counts what the gateway shed, per
model and priority (the request name is ``<model>:<priority>``).

Options (beside Locust's own; each also as an environment variable):

    --traffic-profile PATH  traffic profile (LOCUST_TRAFFIC_PROFILE; default profile.yaml here)
    --shape NAME          constant | step | spike | diurnal (LOCUST_SHAPE); -u is the peak
                           user count and -t the length of the whole curve
    --models MIX          model mix, e.g. "add_sub=8,strings=2" (LOCUST_MODELS)
    --api-keys KEYS       tenant keys, e.g. "k1=3,k2" (LOCUST_API_KEYS)
    --priorities MIX      e.g. "critical=1,standard=6,sheddable=3" (LOCUST_PRIORITIES)
    --think-time-s MIN,MAX  pause between one user's requests (LOCUST_THINK_TIME_S)

Run it with ``python -m loadtest.run`` (bounded, headless, CSV + HTML + JSON) or directly:
``locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --shape spike -u 50 -t 60s``.
"""

from __future__ import annotations

import http
import json
import random
import time
from argparse import Namespace
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml
from locust import FastHttpUser, LoadTestShape, User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

if __package__:  # imported as loadtest.locustfile
    from loadtest import shapes
else:  # run as a file (`locust -f`, the Locust container): its folder is on sys.path
    import shapes  # type: ignore[no-redef,import-not-found]

DEFAULT_PROFILE = Path(__file__).with_name("profile.yaml")
PRIORITIES = ("critical", "standard", "sheddable")
REJECTION_STATUSES = frozenset({429, 503, 504})
MAX_MIX_ENTRIES = 64  # bound on models / tenants a profile may name

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "BOOL": np.bool_, "BYTES": np.object_,
}


# --------------------------------------------------------------------------- the profile

class ProfileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def sample(self) -> np.ndarray[Any, Any]:
        """Request data of this tensor's shape: small numbers, or short texts for BYTES."""
        count = int(np.prod(self.shape)) if self.shape else 1
        if self.datatype == "BYTES":
            words = [f"hello gateway {i}".encode() for i in range(count)]
            return np.array(words, dtype=np.object_).reshape(self.shape)
        values = np.arange(count) % 7
        return values.astype(_NUMPY_DTYPES[self.datatype]).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    weight: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]

    def json_body(self) -> str:
        """The KServe v2 JSON request body (data as flat row-major lists)."""
        inputs = []
        for spec in self.inputs:
            data = spec.sample().reshape(-1).tolist()
            if spec.datatype == "BYTES":
                data = [v.decode() for v in data]
            inputs.append({"name": spec.name, "shape": list(spec.shape),
                            "datatype": spec.datatype, "data": data})
        body = {"inputs": inputs, "outputs": [{"name": o} for o in self.outputs]}
        return json.dumps(body)


ADD_SUB_CONTRACT = (
    (TensorSpec("INPUT0", "FP32", (1, 16)), TensorSpec("INPUT1", "FP32", (1, 16))),
    ("OUTPUT0", "OUTPUT1"),
)


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key: str
    weight: float


@dataclass(frozen=True, slots=True)
class Profile:
    models: tuple[ModelSpec, ...]
    tenants: tuple[Tenant, ...] = ()
    priorities: dict[str, float] = field(default_factory=lambda: {"standard": 1.0})
    think_time_s: tuple[float, float] = (0.05, 0.2)
    request_timeout_s: float = 10.0

    def active_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.weight > 0)


def _tensor(data: Any, where: str) -> TensorSpec:
    if not isinstance(data, dict) or not {"name", "datatype", "shape"} <= data.keys():
        raise ProfileError(f"{where}: expected {{name, datatype, shape}}")
    datatype = str(data["datatype"]).upper()
    if datatype not in _NUMPY_DTYPES:
        raise ProfileError(f"{where}.datatype: unknown datatype {datatype!r}")
    shape = data["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ProfileError(f"{where}.shape: expected a list of positive integers")
    return TensorSpec(str(data["name"]), datatype, tuple(shape))


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ProfileError(f"{where}: expected a weight >= 0, got {value!r}")
    return float(value)


def parse_profile(data: Any) -> Profile:
    """Validate a parsed profile.yaml; errors name the bad key."""
    if not isinstance(data, dict):
        raise ProfileError("profile: expected a mapping")
    models_data = data.get("models") or {}
    if not isinstance(models_data, dict) or len(models_data) > MAX_MIX_ENTRIES:
        raise ProfileError(f"models: expected a mapping of at most {MAX_MIX_ENTRIES} models")
    models = []
    for name, spec in models_data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("inputs"), list):
            raise ProfileError(f"models.{name}: expected {{weight, inputs, outputs}}")
        inputs = tuple(_tensor(t, f"models.{name}.inputs[{i}]")
                        for i, t in enumerate(spec["inputs"]))
        outputs = tuple(str(o) for o in spec.get("outputs") or ())
        models.append(ModelSpec(str(name), _weight(spec.get("weight", 1), f"models.{name}"),
                                 inputs, outputs))
    tenants_data = data.get("tenants") or []
    if not isinstance(tenants_data, list) or len(tenants_data) > MAX_MIX_ENTRIES:
        raise ProfileError(f"tenants: expected a list of at most {MAX_MIX_ENTRIES} tenants")
    tenants = []
    for i, t in enumerate(tenants_data):
        if not isinstance(t, dict) or "key" not in t:
            raise ProfileError(f"tenants[{i}]: expected {{name, key, weight}}")
        tenants.append(Tenant(str(t.get("name", f"tenant-{i}")), str(t["key"]),
                               _weight(t.get("weight", 1), f"tenants[{i}].weight")))
    priorities = data.get("priorities") or {"standard": 1}
    if not isinstance(priorities, dict) or not set(priorities) <= set(PRIORITIES):
        raise ProfileError(f"priorities: expected a mapping over {', '.join(PRIORITIES)}")
    think = data.get("think_time_s", [0.05, 0.2])
    if (not isinstance(think, list) or len(think) != 2
            or not 0 <= _weight(think[0], "think_time_s") <= _weight(think[1], "think_time_s")):
        raise ProfileError("think_time_s: expected [min, max] with 0 <= min <= max")
    timeout = _weight(data.get("request_timeout_s", 10.0), "request_timeout_s")
    profile = Profile(
        models=tuple(models), tenants=tuple(tenants),
        priorities={str(k): _weight(v, f"priorities.{k}") for k, v in priorities.items()},
        think_time_s=(float(think[0]), float(think[1])), request_timeout_s=timeout or 10.0,
    )
    if not profile.active_models():
        raise ProfileError("models: at least one model needs a weight > 0")
    return profile


def parse_mix(text: str, where: str) -> dict[str, float]:
    """``"a=3,b"`` → ``{"a": 3.0, "b": 1.0}``."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ProfileError(f"{where}: bad weight in {item!r}") from None
        if mix[name.strip()] < 0:
            raise ProfileError(f"{where}: negative weight in {item!r}")
    if len(mix) > MAX_MIX_ENTRIES:
        raise ProfileError(f"{where}: at most {MAX_MIX_ENTRIES} entries")
    return mix


def apply_options(profile: Profile, options: Namespace) -> Profile:
    """Command-line overrides on top of the profile file."""
    if getattr(options, "models", ""):
        known = {m.name: m for m in profile.models}
        models = []
        for name, weight in parse_mix(options.models, "--models").items():
            spec = known.get(name) or ModelSpec(name, weight, *ADD_SUB_CONTRACT)
            models.append(replace(spec, weight=weight))
        profile = replace(profile, models=tuple(models))
    if getattr(options, "api_keys", ""):
        keys = parse_mix(options.api_keys, "--api-keys")
        profile = replace(profile, tenants=tuple(
            Tenant(f"key-{i}", key, weight) for i, (key, weight) in enumerate(keys.items())))
    if getattr(options, "priorities", ""):
        priorities = parse_mix(options.priorities, "--priorities")
        if not set(priorities) <= set(PRIORITIES):
            raise ProfileError(f"--priorities: expected names among {', '.join(PRIORITIES)}")
        profile = replace(profile, priorities=priorities)
    if getattr(options, "think_time_s", ""):
        low, _, high = options.think_time_s.partition(",")
        try:
            bounds = (float(low), float(high or low))
        except ValueError:
            raise ProfileError("--think-time-s: expected MIN,MAX seconds") from None
        profile = replace(profile, think_time_s=bounds)
    if not profile.active_models():
        raise ProfileError("--models: at least one model needs a weight > 0")
    return profile


def load_profile(path: str | Path) -> Profile:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    return parse_profile(data)


# --------------------------------------------------------------------------- per request

@dataclass(frozen=True, slots=True)
class Pick:
    model: ModelSpec
    headers: dict[str, str]
    name: str  # the Locust request name: "<model>:<priority>"


class Mix:
    """Weighted choice of model, tenant and priority for each request."""

    __slots__ = ("_models", "_priorities", "_profile", "_rng", "_tenants")

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        self._profile = profile
        self._rng = rng
        self._models = profile.active_models()
        self._tenants = tuple(t for t in profile.tenants if t.weight > 0)
        self._priorities = tuple(p for p, w in profile.priorities.items() if w > 0)

    def pick(self) -> Pick:
        rng = self._rng
        model = rng.choices(self._models, weights=[m.weight for m in self._models])[0]
        headers: dict[str, str] = {}
        priority = "standard"
        if self._priorities:
            weights = [self._profile.priorities[p] for p in self._priorities]
            priority = rng.choices(self._priorities, weights=weights)[0]
            headers["X-Priority"] = priority
        if self._tenants:
            tenant = rng.choices(self._tenants, weights=[t.weight for t in self._tenants])[0]
            headers["Authorization"] = f"Bearer {tenant.key}"
        return Pick(model, headers, f"{model.name}:{priority}")

    def think_time_s(self) -> float:
        low, high = self._profile.think_time_s
        return self._rng.uniform(low, high)


class RejectedError(Exception):
    """The server refused the request (429, 503, 504): load shed or rate limited."""


class HttpStatusError(Exception):
    """Any other non-200 answer."""


def status_error(status: int) -> Exception:
    """A bounded set of error texts, so Locust's failure table groups them by status."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    text = f"HTTP {status} {phrase}"
    return RejectedError(text) if status in REJECTION_STATUSES else HttpStatusError(text)


_profile: Profile | None = None


def current_profile() -> Profile:
    global _profile
    if _profile is None:  # e.g. a user class run without Locust's init event
        _profile = load_profile(DEFAULT_PROFILE)
    return _profile


# --------------------------------------------------------------------------- Locust hooks

@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--traffic-profile", default=str(DEFAULT_PROFILE),
                        env_var="LOCUST_TRAFFIC_PROFILE",
                        help="traffic profile YAML (models, tenants, priorities)")
    parser.add_argument("--shape", default="constant", choices=sorted(shapes.SHAPES),
                        env_var="LOCUST_SHAPE", help="load shape; -u = peak users, -t = length")
    parser.add_argument("--models", default="", env_var="LOCUST_MODELS",
                        help='model mix, e.g. "add_sub=8,strings=2"')
    parser.add_argument("--api-keys", default="", env_var="LOCUST_API_KEYS",
                        help='tenant API keys with weights, e.g. "k1=3,k2"', is_secret=True)
    parser.add_argument("--priorities", default="", env_var="LOCUST_PRIORITIES",
                        help='priority mix, e.g. "critical=1,standard=6,sheddable=3"')
    parser.add_argument("--think-time-s", default="", env_var="LOCUST_THINK_TIME_S",
                        help="pause between one user's requests: MIN,MAX seconds")


@events.init.add_listener  # type: ignore[untyped-decorator]
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _profile
    options = environment.parsed_options
    if options is None:
        return
    _profile = apply_options(load_profile(options.traffic_profile), options)
    KServeHttpUser.network_timeout = _profile.request_timeout_s
    KServeHttpUser.connection_timeout = min(5.0, _profile.request_timeout_s)


class SelectedShape(LoadTestShape):
    """The shape named by ``--shape``; Locust sees only this one shape class."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._delegate: shapes.ConfiguredShape | None = None

    def tick(self) -> tuple[int, float] | None:
        if self._delegate is None:
            options = self.runner.environment.parsed_options if self.runner else None
            name = getattr(options, "shape", "constant") if options else "constant"
            self._delegate = shapes.SHAPES[name]()
            self._delegate.runner = self.runner
        self._delegate.start_time = self.start_time
        return self._delegate.tick()


# --------------------------------------------------------------------------- the users

class TritonUser(User):
    """Binary-tensor inference through tritonclient.http's sync (gevent) client."""

    weight = 1

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.mix = Mix(current_profile(), random.Random())
        self._inputs: dict[str, tuple[list[Any], list[Any]]] = {}
        self._client: Any = None

    def wait_time(self) -> float:
        return self.mix.think_time_s()

    def on_start(self) -> None:
        import tritonclient.http as triton_http  # only this user needs it

        self._triton = triton_http
        parts = urlsplit(self.host or "http://127.0.0.1:8000")
        timeout_s = current_profile().request_timeout_s
        self._client = triton_http.InferenceServerClient(
            url=parts.netloc + parts.path.rstrip("/"), ssl=parts.scheme == "https",
            concurrency=1, connection_timeout=min(5.0, timeout_s), network_timeout=timeout_s)

    def on_stop(self) -> None:
        if self._client is not None:
            self._client.close()

    def _tensors(self, model: ModelSpec) -> tuple[list[Any], list[Any]]:
        if model.name not in self._inputs:
            inputs = []
            for spec in model.inputs:
                tensor = self._triton.InferInput(spec.name, list(spec.shape), spec.datatype)
                tensor.set_data_from_numpy(spec.sample(), binary_data=True)
                inputs.append(tensor)
            outputs = [self._triton.InferRequestedOutput(name, binary_data=True)
                        for name in model.outputs]
            self._inputs[model.name] = (inputs, outputs)
        return self._inputs[model.name]

    @task
    def infer(self) -> None:
        pick = self.mix.pick()
        inputs, outputs = self._tensors(pick.model)
        exception: Exception | None = None
        length = 0
        started = time.perf_counter()
        try:
            result = self._client.infer(pick.model.name, inputs, outputs=outputs or None,
                                         headers=pick.headers)
            length = _result_bytes(result, pick.model.outputs)
        except Exception as exc:  # every failure becomes a Locust failure, never a crash
            status = getattr(exc, "status", None)
            code = status() if callable(status) else None
            exception = status_error(int(code)) if code and str(code).isdigit() else exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.environment.events.request.fire(
            request_type="triton", name=pick.name, response_time=elapsed_ms,
            response_length=length, exception=exception, context={"model": pick.model.name},
        )


def _result_bytes(result: Any, outputs: tuple[str, ...]) -> int:
    """Bytes of the answer: JSON header plus each output's tensor payload."""
    size = len(json.dumps(result.get_response()))
    for name in outputs:
        array = result.as_numpy(name)
        if array is None:
            continue
        if array.dtype == np.object_:
            size += sum(4 + len(v) for v in array.reshape(-1))
        else:
            size += int(array.nbytes)
    return size


class KServeHttpUser(FastHttpUser):
    """KServe v2 JSON inference with Locust's FastHttpUser (geventhttpclient)."""

    weight = 1

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.mix = Mix(current_profile(), random.Random())
        self._bodies: dict[str, str] = {}

    def wait_time(self) -> float:
        return self.mix.think_time_s()

    @task
    def infer(self) -> None:
        pick = self.mix.pick()
        body = self._bodies.get(pick.model.name)
        if body is None:
            body = self._bodies[pick.model.name] = pick.model.json_body()
        headers = {"Content-Type": "application/json", **pick.headers}
        with self.client.post(f"/v2/models/{pick.model.name}/infer", data=body,
                               headers=headers, name=pick.name, catch_response=True) as resp:
            if resp.status_code == 200:
                resp.success()
            elif resp.status_code:
                resp.failure(status_error(resp.status_code))
            # status 0: a connection error Locust has already recorded as a failure
