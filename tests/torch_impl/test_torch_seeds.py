"""The usage people expect, from the seed examples, with torch_impl in place of nn.ConvLSTM2d.

The seeds' own classes are copied (smaller sizes) and their printed shapes asserted; then
torch_impl's StatefulLSTM / StatefulConvLSTM / StatefulWrapper, given the same weights, must
give the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import torch_impl

# --- seed 004, example 1 and 2: hand-written stateful modules -------------------------------


class SeedStatefulLSTM(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.h_t = None
        self.c_t = None

    def forward(self, x):
        if self.h_t is None:
            batch_size = x.size(0)
            self.h_t = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=x.device)
            self.c_t = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=x.device)
        output, (self.h_t, self.c_t) = self.lstm(x, (self.h_t, self.c_t))
        return output

    def reset_states(self):
        self.h_t = None
        self.c_t = None


class SeedStatefulConvLSTM(nn.Module):
    def __init__(self, input_channels, hidden_channels, kernel_size, num_layers):
        super().__init__()
        self.convlstm = torch_impl.ConvLSTM2d(
            input_channels, hidden_channels, kernel_size, num_layers=num_layers, batch_first=True
        )
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.kernel_size = kernel_size
        self.h_t = None
        self.c_t = None

    def forward(self, x):
        if self.h_t is None:
            batch_size, _, height, width = x.size(0), x.size(1), x.size(3), x.size(4)
            self.h_t = torch.zeros(self.num_layers, batch_size, self.hidden_channels, height, width, device=x.device)
            self.c_t = torch.zeros(self.num_layers, batch_size, self.hidden_channels, height, width, device=x.device)
        output, (self.h_t, self.c_t) = self.convlstm(x, (self.h_t, self.c_t))
        return output

    def reset_states(self):
        self.h_t = None
        self.c_t = None


def test_seed_stateful_lstm_example():
    input_size, hidden_size, num_layers, seq_len, batch_size = 10, 20, 2, 30, 5
    torch.manual_seed(0)
    seed = SeedStatefulLSTM(input_size, hidden_size, num_layers)
    ours = torch_impl.StatefulLSTM(input_size, hidden_size, num_layers)
    ours.lstm.load_state_dict(seed.lstm.state_dict())
    for _ in range(2):  # the second batch continues from the first one's states
        input_data = torch.randn(batch_size, seq_len, input_size)
        output = seed(input_data)
        assert output.shape == (5, 30, 20)
        assert torch.equal(ours(input_data), output)
    seed.reset_states()
    ours.reset_states()
    assert ours.state is None


def test_seed_stateful_convlstm_example():
    input_channels, hidden_channels, kernel_size, num_layers = 3, 16, 3, 2
    seq_len, batch_size, height, width = 3, 2, 16, 16  # the seed: 20, 4, 64, 64
    torch.manual_seed(1)
    seed = SeedStatefulConvLSTM(input_channels, hidden_channels, kernel_size, num_layers)
    ours = torch_impl.StatefulConvLSTM(input_channels, hidden_channels, kernel_size, num_layers)
    ours.convlstm.load_state_dict(seed.convlstm.state_dict())
    for _ in range(2):
        input_data = torch.randn(batch_size, seq_len, input_channels, height, width)
        output = seed(input_data)
        assert output.shape == (2, 3, 16, 16, 16)  # the seed prints (4, 20, 16, 64, 64)
        assert torch.equal(ours(input_data), output)
    assert ours.state[0].shape == seed.h_t.shape == (2, 2, 16, 16, 16)
    seed.reset_states()
    ours.reset_states()


# --- seed 004, example 3: one wrapper for both kinds ----------------------------------------


def test_seed_stateful_wrapper_example():
    lstm = nn.LSTM(10, 20, 2, batch_first=True)
    stateful_lstm = torch_impl.StatefulWrapper(lstm)
    output = stateful_lstm(torch.randn(5, 30, 10))
    assert output.shape == (5, 30, 20)
    output2 = stateful_lstm(torch.randn(5, 30, 10))
    assert output2.shape == (5, 30, 20)
    stateful_lstm.reset_states()

    convlstm = torch_impl.ConvLSTM2d(3, 16, 3, num_layers=2, batch_first=True)
    stateful_convlstm = torch_impl.StatefulWrapper(convlstm)
    output = stateful_convlstm(torch.randn(2, 3, 3, 16, 16))
    assert output.shape == (2, 3, 16, 16, 16)
    output2 = stateful_convlstm(torch.randn(2, 3, 3, 16, 16))
    assert output2.shape == (2, 3, 16, 16, 16)
    stateful_convlstm.reset_states()
    assert stateful_convlstm.state is None


# --- seed 000: carrying (h, c) by hand, and the same with the wrapper ------------------------


def test_seed_manual_state_passing_with_convlstm():
    """Seed 000 example 1 with a ConvLSTM2d: shapes as nn.LSTM's, state passed by hand."""
    convlstm = torch_impl.ConvLSTM2d(input_channels=2, hidden_channels=4, kernel_size=3)
    input_seq = torch.randn(5, 1, 2, 8, 8)  # sequence length 5, batch size 1
    h_0, c_0 = torch.randn(1, 1, 4, 8, 8), torch.randn(1, 1, 4, 8, 8)
    output, (h_n, c_n) = convlstm(input_seq, (h_0, c_0))
    assert output.shape == (5, 1, 4, 8, 8)
    assert h_n.shape == c_n.shape == (1, 1, 4, 8, 8)
    output_2, (h_n_2, c_n_2) = convlstm(torch.randn(3, 1, 2, 8, 8), (h_n, c_n))
    assert output_2.shape == (3, 1, 4, 8, 8) and h_n_2.shape == c_n_2.shape == (1, 1, 4, 8, 8)
    output, (h_n, _) = convlstm(torch.randn(5, 3, 2, 8, 8))  # example 2: no state means zeros
    assert output.shape == (5, 3, 4, 8, 8) and h_n.shape == (1, 3, 4, 8, 8)


def test_seed_segment_loop_equals_wrapper():
    """Seed 000 example 3: the hand-written segment loop, and StatefulWrapper doing it."""
    torch.manual_seed(2)
    lstm = nn.LSTM(input_size=10, hidden_size=20)
    input_full_seq = torch.randn(10, 1, 10)
    sequence_length, segment_size = input_full_seq.shape[0], 3
    stream = torch_impl.StatefulWrapper(lstm)
    h = c = None
    for i in range(0, sequence_length, segment_size):
        input_segment = input_full_seq[i : min(i + segment_size, sequence_length), :, :]
        output, (h, c) = lstm(input_segment, (h, c)) if (h is not None and c is not None) else lstm(input_segment)
        assert output.shape == (min(segment_size, sequence_length - i), 1, 20)
        assert torch.equal(stream(input_segment), output)
    assert torch.equal(stream.state[0], h) and torch.equal(stream.state[1], c)
