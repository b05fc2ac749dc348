"""GQEConfig: the keys of gqe's config.json, with gqe's defaults and refusals."""

import json
import math

from . import strict_json
from .errors import BadInput
from .safetensors_io import read_file_bytes

# The C++ library's size limits, so that a config gqe-run refuses is refused here too.
_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 11,
    "max_position_embeddings": 1 << 24,
}
VARIANTS = ("gqe", "hard_concat", "weighted_concat")
MAX_CONFIG_BYTES = 16 << 20  # as gqe: a config is a few hundred bytes
# Keys this class reads; any other key is kept in `extra` and ignored, as Hugging Face does.
KNOWN_KEYS = ("attention_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "gqe_top_k", "gqe_variant",
              "rms_norm_eps", "rope_theta", "tie_word_embeddings", "max_position_embeddings",
              "rope_scaling", "attention_bias", "mlp_bias", "rope_parameters")
# Written by to_dict() from the model itself, so not carried over from `extra`.
_DERIVED_KEYS = ("architectures", "model_type", "hidden_act", "torch_dtype")


def _describe(v):
    return json.dumps(v) if isinstance(v, (str, bool, int, float, type(None))) else type(v).__name__


def _same_json(v, expected):
    """v == expected as JSON compares them: 1 is not true and 0 is not false, as in gqe's C++ reader."""
    return type(v) is type(expected) and v == expected


def _refuse_unimplemented(d):
    """Keys of Llama-family configs whose values change what the model computes in ways gqe does not
    implement: refused unless they say what gqe computes (null counts as absent)."""
    for key, feature in (("rope_scaling", "RoPE scaling"), ("attention_bias", "attention biases"),
                         ("mlp_bias", "MLP biases")):
        if d.get(key) is not None and not _same_json(d[key], False):
            raise BadInput(f'config: "{key}" is {_describe(d[key])}; gqe does not implement {feature} '
                           "(expected null or false)")
    for key, value, reason in (("hidden_act", "silu", "gqe computes SwiGLU with SiLU"),
                               ("use_rope", True, "gqe always applies RoPE")):
        if d.get(key) is not None and not _same_json(d[key], value):
            raise BadInput(f'config: "{key}" is {_describe(d[key])}; {reason} (expected {json.dumps(value)})')
    # Qwen-style configs give a window size beside a switch that leaves it off.
    window = "use_sliding_window" if d.get("use_sliding_window") is not None else "sliding_window"
    if d.get(window) is not None and not _same_json(d[window], False):
        raise BadInput(f'config: "{window}" is {_describe(d[window])}; gqe does not implement sliding-window attention '
                       "(expected null or false)")
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list):
            raise BadInput(f'config: "layer_types" is {_describe(types)}; expected a list')
        for i, t in enumerate(types):
            if t != "full_attention":
                raise BadInput(f'config: "layer_types" gives layer {i} {_describe(t)}; gqe runs full attention in '
                               'every layer (expected "full_attention")')


class GQEConfig:
    """GQEConfig(**config_json): e.g. GQEConfig(**json.load(open("config.json"))).

    Required: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, and gqe_top_k when attention_type is "gqe". Defaults: attention_type
    "gqa", num_key_value_heads = num_attention_heads, head_dim = hidden_size /
    num_attention_heads, gqe_variant "gqe", rms_norm_eps 1e-6, rope_theta 10000,
    tie_word_embeddings false, max_position_embeddings 4096. rope_scaling, attention_bias and
    mlp_bias must be absent, null or false. Raises BadInput naming the key.
    """

    def __init__(self, **config):
        self._d = config
        _refuse_unimplemented(config)
        self.attention_type = self._string("attention_type", "gqa")
        if self.attention_type not in ("gqa", "gqe"):
            raise BadInput(f'config: "attention_type" is {_describe(self.attention_type)}; expected "gqa" or "gqe"')
        self.gqe_variant = self._string("gqe_variant", "gqe")
        if self.gqe_variant not in VARIANTS:
            raise BadInput(f'config: "gqe_variant" is {_describe(self.gqe_variant)}; expected one of {", ".join(VARIANTS)}')
        self.vocab_size = self._size("vocab_size")
        self._check_token_ids("eos_token_id")
        self.hidden_size = self._size("hidden_size")
        self.intermediate_size = self._size("intermediate_size")
        self.num_hidden_layers = self._size("num_hidden_layers")
        self.num_attention_heads = self._size("num_attention_heads")
        self.num_key_value_heads = self._size("num_key_value_heads", self.num_attention_heads)
        if self._has("head_dim"):
            self.head_dim = self._size("head_dim")
        elif self.hidden_size % self.num_attention_heads != 0:
            raise BadInput(f'config: "head_dim" is absent and hidden_size {self.hidden_size} is not a multiple of '
                           f"num_attention_heads {self.num_attention_heads}; expected head_dim to be given")
        else:
            self.head_dim = self._size("head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2 != 0:
            raise BadInput(f'config: "head_dim" is {self.head_dim}; expected an even number (RoPE pairs)')
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise BadInput(f'config: "num_attention_heads" is {self.num_attention_heads}; expected a multiple of '
                           f"num_key_value_heads ({self.num_key_value_heads})")
        if self.attention_type == "gqe":
            self.gqe_top_k = self._integer("gqe_top_k")
            if not 1 <= self.gqe_top_k <= self.experts_per_group:
                raise BadInput(f'config: "gqe_top_k" is {self.gqe_top_k}; expected 1 to num_attention_heads / '
                               f"num_key_value_heads = {self.experts_per_group}")
        else:
            self.gqe_top_k = self._integer("gqe_top_k", 1)
        self.rms_norm_eps = self._number("rms_norm_eps", 1e-6)
        if not 0 < self.rms_norm_eps <= 1:
            raise BadInput(f'config: "rms_norm_eps" is {self.rms_norm_eps}; expected a number in (0, 1]')
        self.rope_theta = self._rope_theta()
        if not 0 < self.rope_theta <= 1e12:
            raise BadInput(f'config: "rope_theta" is {self.rope_theta}; expected a positive number up to 1e12')
        self.tie_word_embeddings = self._boolean("tie_word_embeddings", False)
        self.max_position_embeddings = self._size("max_position_embeddings", 4096)
        self.extra = {k: v for k, v in config.items() if k not in KNOWN_KEYS}
        del self._d

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def is_gqe(self):
        return self.attention_type == "gqe"

    @property
    def experts_per_group(self):  # M
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_output_slots(self):  # S: d_h-wide slots entering o_proj
        if not self.is_gqe:
            return self.num_attention_heads
        kg = self.gqe_top_k * self.num_key_value_heads
        return kg + 2 if self.gqe_variant == "gqe" else kg

    def to_dict(self):
        """config.json's contents: the keys gqe-run writes, in its order, then the unknown keys."""
        d = {
            "architectures": ["GQEForCausalLM" if self.is_gqe else "LlamaForCausalLM"],
            "model_type": "gqe" if self.is_gqe else "llama",
            "attention_type": self.attention_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
        }
        if self.is_gqe:
            d["gqe_top_k"] = self.gqe_top_k
            d["gqe_variant"] = self.gqe_variant
        d.update({
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        })
        for k, v in self.extra.items():
            if k not in _DERIVED_KEYS:
                d[k] = v
        return d

    def __getattr__(self, name):
        # Unknown keys read like known ones (config.eos_token_id), as in Hugging Face.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def __repr__(self):
        return f"GQEConfig(**{self.to_dict()!r})"

    # -- readers: each refuses a value of the wrong JSON type, naming its key -------------------
    def _has(self, key):
        return self._d.get(key) is not None

    def _integer(self, key, default=None):
        if not self._has(key):
            if default is None:
                raise BadInput(f'config: "{key}" is required')
            return default
        v = self._d[key]
        if isinstance(v, float) and math.isfinite(v) and v == math.floor(v) and abs(v) < 9e15:
            return int(v)  # 256.0 is an integer written as a float; 2.5 is not
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadInput(f'config: "{key}" is {_describe(v)}; expected an integer')
        return v

    def _size(self, key, default=None):
        v = self._integer(key, default)
        if not 1 <= v <= _LIMITS[key]:
            raise BadInput(f'config: "{key}" is {v}; expected 1 to {_LIMITS[key]}')
        return v

    def _number(self, key, default):
        if not self._has(key):
            return default
        v = self._d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f'config: "{key}" is {_describe(v)}; expected a number')
        return float(v)

    def _rope_theta(self):
        """RoPE's base; newer Hugging Face configs keep it in "rope_parameters": {"rope_type":
        "default", "rope_theta": ...}, where any other type or setting is refused as scaling is."""
        top = self._number("rope_theta", 10000.0)
        p = self._d.get("rope_parameters")
        if p is None:
            return top
        if not isinstance(p, dict):
            raise BadInput(f'config: "rope_parameters" is {_describe(p)}; expected an object such as '
                           '{"rope_type": "default", "rope_theta": 10000.0}')
        for key, value in p.items():
            if key not in ("rope_type", "type", "rope_theta") and value is not None:
                raise BadInput(f'config: "rope_parameters" sets {json.dumps(key)}; gqe implements plain RoPE, set by '
                               "rope_theta alone")
        for key in ("rope_type", "type"):
            if p.get(key) is not None and p[key] != "default":
                raise BadInput(f'config: "rope_parameters": "{key}" is {_describe(p[key])}; gqe does not implement '
                               'RoPE scaling (expected "default")')
        theta = p.get("rope_theta")
        if theta is None:
            return top
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise BadInput(f'config: "rope_parameters": "rope_theta" is {_describe(theta)}; expected a number')
        if self._has("rope_theta") and float(theta) != top:
            raise BadInput(f'config: "rope_theta" is {_describe(self._d["rope_theta"])} but "rope_parameters" gives '
                           f"{_describe(theta)}; expected one value")
        return float(theta)

    def _boolean(self, key, default):
        if not self._has(key):
            return default
        v = self._d[key]
        if not isinstance(v, bool):
            raise BadInput(f'config: "{key}" is {_describe(v)}; expected true or false')
        return v

    def _check_token_ids(self, key):
        """An integer or a list of integers below vocab_size, as Hugging Face writes eos_token_id; kept
        in `extra` as given."""
        if not self._has(key):
            return
        v = self._d[key]
        for item in v if isinstance(v, list) else [v]:
            integral = isinstance(item, int) and not isinstance(item, bool)
            if not integral and not (isinstance(item, float) and item.is_integer()):
                raise BadInput(f'config: "{key}" is {json.dumps(v)}; expected a token id or a list of token ids')
            if not 0 <= item < self.vocab_size:
                raise BadInput(f"config: {key} {int(item)} is not a token of this model; expected an id from 0 to "
                               f"vocab_size - 1 = {self.vocab_size - 1}")

    def _string(self, key, default):
        if not self._has(key):
            return default
        v = self._d[key]
        if not isinstance(v, str):
            raise BadInput(f'config: "{key}" is {_describe(v)}; expected a string')
        return v


def load_config(path):
    """GQEConfig from a config.json file; BadInput names the file on any problem."""
    try:
        text = read_file_bytes(path, MAX_CONFIG_BYTES, "the model's config.json").decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not UTF-8 text") from None
    try:
        d = strict_json.loads(text)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except ValueError as e:
        raise BadInput(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BadInput(f"{path} is JSON but not an object")
    try:
        return GQEConfig(**d)
    except BadInput as e:
        raise BadInput(str(e).replace("config:", f"{path}:", 1)) from None
