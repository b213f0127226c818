"""The benchmarked shapes and their analytic FLOP counts (matmuls and convolutions only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

# Gate blocks per cell type: how many H-wide outputs the input and hidden maps produce.
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CELL_LABELS = {"lstm": "", "gru": "GRU ", "rnn_tanh": "RNN tanh ", "rnn_relu": "RNN relu "}


@dataclass(frozen=True)
class DenseConfig:
    """A dense recurrent stack (torch.nn.LSTM / GRU / RNN shapes); ``cell`` a key of GATES."""

    name: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    note: str = ""
    cell: str = "lstm"

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def describe(self) -> str:
        s = CELL_LABELS[self.cell] + (
            f"B{self.batch} T{self.steps} I{self.input_size} H{self.hidden_size} "
            f"L{self.num_layers}"
        )
        if self.bidirectional:
            s += " bidir"
        if self.proj_size:
            s += f" P{self.proj_size}"
        return s

    def forward_flops(self) -> float:
        """2*B*T*G*H*(I_k + H_out) per layer-direction (G gates: LSTM 4, GRU 3, RNN 1), plus
        the projection 2*B*T*H*P."""
        b, t, h, p = self.batch, self.steps, self.hidden_size, self.proj_size
        total = 0.0
        in_features = self.input_size
        for _ in range(self.num_layers):
            for _ in range(self.directions):
                total += 2.0 * b * t * self.gates * h * (in_features + self.output_size)
                if p:
                    total += 2.0 * b * t * h * p
            in_features = self.directions * self.output_size
        return total

    def as_dict(self) -> dict:
        return asdict(self)


LSTMConfig = DenseConfig  # the name the LSTM-only suite used


@dataclass(frozen=True)
class ConvLSTMConfig:
    name: str
    batch: int
    steps: int
    in_channels: int
    hidden_channels: int
    height: int
    width: int
    kernel: int
    num_layers: int = 1
    note: str = ""

    def describe(self) -> str:
        return (
            f"B{self.batch} T{self.steps} {self.in_channels}->{self.hidden_channels} "
            f"{self.height}x{self.width} k{self.kernel} L{self.num_layers}"
        )

    def forward_flops(self) -> float:
        """2*B*T*H*W*4Hc*(C_k + Hc)*kh*kw per layer."""
        total = 0.0
        c_in = self.in_channels
        hc = self.hidden_channels
        for _ in range(self.num_layers):
            total += (
                2.0 * self.batch * self.steps * self.height * self.width * 4 * hc
                * (c_in + hc) * self.kernel * self.kernel
            )
            c_in = hc
        return total

    def as_dict(self) -> dict:
        return asdict(self)


def pass_flops(forward_flops: float, pass_name: str) -> float:
    """Forward as counted; forward+backward as 3x forward (backward ~ 2x forward)."""
    return forward_flops * (3.0 if pass_name == "fwdbwd" else 1.0)


LSTM_CONFIGS = [
    LSTMConfig("cfg1", 32, 128, 64, 128),
    LSTMConfig("cfg2", 64, 256, 128, 256, num_layers=2),
    LSTMConfig("cfg3", 1, 1024, 32, 64, note="streaming latency"),
    LSTMConfig("cfg1-bidir", 32, 128, 64, 128, bidirectional=True),
    LSTMConfig("cfg1-proj", 32, 128, 64, 128, proj_size=64),
]

# GRU and Elman RNN at the LSTM's shapes (same input sizes): their ratios read against the
# LSTM's at the same configuration.
GRU_CONFIGS = [
    DenseConfig("cfg1", 32, 128, 64, 128, cell="gru"),
    DenseConfig("cfg2", 64, 256, 128, 256, num_layers=2, cell="gru"),
    DenseConfig("cfg3", 1, 1024, 32, 64, note="streaming latency", cell="gru"),
]

RNN_CONFIGS = [
    DenseConfig("cfg1", 32, 128, 64, 128, cell="rnn_tanh"),
]

CONVLSTM_CONFIGS = [
    ConvLSTMConfig("c1", 4, 10, 3, 16, 64, 64, 3),
    ConvLSTMConfig("c2", 8, 20, 1, 32, 32, 32, 5, num_layers=2),
]

PASSES = ("fwd", "fwdbwd")

# The streaming case: cfg1 in chunks of this many steps.
STREAM_CONFIG = LSTM_CONFIGS[0]
STREAM_CHUNK = 16

SGEMM_SIZE = 2048


def find_lstm(name: str) -> Optional[DenseConfig]:
    return next((c for c in LSTM_CONFIGS if c.name == name), None)
