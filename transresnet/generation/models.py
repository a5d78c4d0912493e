"""Caption decoders over a backbone's grid features, conditioned on a personality trait.

Every decoder exposes the same three steps, which training (teacher forcing) and decoding (greedy,
sampling, beam search) both drive:

- ``prepare(grid, trait_ids) -> Context``: project the grid cells (B, cells, F) once per image;
- ``initial_state(context) -> State``: the recurrent state before ``<bos>``;
- ``step(tokens, state, context) -> (logits, state)``: one word.

Families (``model.family``):

- **showtell** (Vinyals et al.): the mean of the grid (the backbone's global-pooled vector) projected to
  the decoder. ``image_input: init_state`` maps it to the initial state; ``first_input`` feeds it as the
  input of one step before ``<bos>`` (the paper's choice). ``image_every_step`` adds it to every step's
  input, which for the vanilla cell is the lecture's ``h = tanh(Wxh x + Whh h + Wih v)``.
- **showatttell** (Xu et al.): soft attention over the grid cells at every step, from the previous state,
  with the context gated by ``sigmoid(W h)`` (the paper's beta); state initialised from the mean cell.
- **updown** (Anderson et al.): an attention layer on [language state, mean feature, word] and a language
  layer on [attended feature, attention state]. The paper attends over detector regions; no region
  detector is available here, so it attends over the grid cells (the "grid features" variant).

The recurrent cell is ``rnn`` (tanh), ``gru`` or ``lstm``. The trait embedding (slot 0 = no personality)
is part of every step's input and, with ``trait_in_init``, also of the initial state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from transresnet.config import DecoderConfig
from transresnet.generation.vocab import PAD_ID

State = tuple[torch.Tensor, ...]


@dataclass
class Context:
    """Per-row conditioning: projected grid cells, their mean, attention keys and the trait vector."""

    mean: torch.Tensor  # (B, D)
    cells: torch.Tensor | None = None  # (B, N, D)
    keys: torch.Tensor | None = None  # (B, N, A)
    trait: torch.Tensor | None = None  # (B, T)

    def index_select(self, index: torch.Tensor) -> Context:
        """Rows ``index`` of every tensor (beam expansion and reordering)."""
        return Context(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)})


class Cell(nn.Module):
    """One recurrent step of a vanilla tanh RNN, a GRU or an LSTM; state (h,) or (h, c)."""

    def __init__(self, kind: str, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.hidden_dim = hidden_dim
        if kind == "rnn":
            self.cell: nn.Module = nn.RNNCell(input_dim, hidden_dim, nonlinearity="tanh")
        elif kind == "gru":
            self.cell = nn.GRUCell(input_dim, hidden_dim)
        elif kind == "lstm":
            self.cell = nn.LSTMCell(input_dim, hidden_dim)
        else:
            raise ValueError(f"unknown cell {kind!r} (rnn, gru or lstm)")

    @property
    def state_size(self) -> int:
        return 2 if self.kind == "lstm" else 1

    def forward(self, x: torch.Tensor, state: State) -> State:
        if self.kind == "lstm":
            return tuple(self.cell(x, (state[0], state[1])))
        return (self.cell(x, state[0]),)

    def zeros(self, batch: int, like: torch.Tensor) -> State:
        return tuple(like.new_zeros(batch, self.hidden_dim) for _ in range(self.state_size))


class Attention(nn.Module):
    """Additive soft attention: ``alpha = softmax(w . tanh(W_f f + W_h h))``, context ``sum alpha f``."""

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(query_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, keys: torch.Tensor, cells: torch.Tensor,
                query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy = self.score(torch.tanh(keys + self.query(query).unsqueeze(1))).squeeze(-1)
        alpha = energy.softmax(dim=-1)
        return (alpha.unsqueeze(-1) * cells).sum(1), alpha


class CaptionDecoder(nn.Module):
    """Shared parts: word and trait embeddings, the grid projection, the initial-state map, the output."""

    family = ""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, grid_dim: int, trait_slots: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=PAD_ID)
        self.project = nn.Sequential(nn.Linear(grid_dim, cfg.feature_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.trait = nn.Embedding(trait_slots, cfg.trait_dim) if trait_slots else None
        self.trait_dim = cfg.trait_dim if trait_slots else 0
        self.dropout = nn.Dropout(cfg.dropout)

    def _trait(self, trait_ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.trait is None else self.trait(trait_ids)

    def _with_trait(self, parts: list[torch.Tensor], ctx: Context) -> torch.Tensor:
        return torch.cat(parts if ctx.trait is None else [*parts, ctx.trait], dim=-1)

    def _init_from(self, layer: nn.Linear | None, trait_layer: nn.Linear | None, source: torch.Tensor | None,
                   ctx: Context, cell: Cell) -> State:
        """tanh(W source [+ W_t trait]) split into the cell's state tensors; zeros when there is neither."""
        total = None
        if layer is not None and source is not None:
            total = layer(source)
        if trait_layer is not None and ctx.trait is not None:
            total = trait_layer(ctx.trait) if total is None else total + trait_layer(ctx.trait)
        if total is None:
            return cell.zeros(ctx.mean.shape[0], ctx.mean)
        return tuple(torch.tanh(total).chunk(cell.state_size, dim=-1))

    def _trait_init(self, cell: Cell) -> nn.Linear | None:
        if self.cfg.trait_in_init and self.trait is not None:
            return nn.Linear(self.trait_dim, cell.state_size * cell.hidden_dim)
        return None

    def prepare(self, grid: torch.Tensor, trait_ids: torch.Tensor) -> Context:
        raise NotImplementedError

    def initial_state(self, ctx: Context) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, ctx: Context) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def forward(self, grid: torch.Tensor, trait_ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return teacher_forced(self, grid, trait_ids, inputs)


def teacher_forced(decoder: nn.Module, grid: torch.Tensor, trait_ids: torch.Tensor,
                   inputs: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through any decoder's three steps: logits (B, L, V) for the next token after each of
    ``inputs`` (B, L)."""
    ctx = decoder.prepare(grid, trait_ids)
    state = decoder.initial_state(ctx)
    logits = []
    for t in range(inputs.shape[1]):
        out, state = decoder.step(inputs[:, t], state, ctx)
        logits.append(out)
    return torch.stack(logits, dim=1)


class ShowTell(CaptionDecoder):
    family = "showtell"

    def __init__(self, cfg: DecoderConfig, vocab_size: int, grid_dim: int, trait_slots: int) -> None:
        super().__init__(cfg, vocab_size, grid_dim, trait_slots)
        image_term = cfg.feature_dim if cfg.image_every_step else 0
        self.cell = Cell(cfg.cell, cfg.embed_dim + self.trait_dim + image_term, cfg.hidden_dim)
        size = self.cell.state_size * cfg.hidden_dim
        self.init = nn.Linear(cfg.feature_dim, size) if cfg.image_input == "init_state" else None
        self.image_word = nn.Linear(cfg.feature_dim, cfg.embed_dim) if cfg.image_input == "first_input" else None
        self.trait_init = self._trait_init(self.cell)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)

    def prepare(self, grid: torch.Tensor, trait_ids: torch.Tensor) -> Context:
        return Context(mean=self.project(grid.mean(dim=1)), trait=self._trait(trait_ids))

    def _input(self, word: torch.Tensor, ctx: Context) -> torch.Tensor:
        parts = [word, ctx.mean] if self.cfg.image_every_step else [word]
        return self._with_trait(parts, ctx)

    def initial_state(self, ctx: Context) -> State:
        state = self._init_from(self.init, self.trait_init, ctx.mean, ctx, self.cell)
        if self.image_word is not None:  # the image is the input of one step before <bos>
            state = self.cell(self._input(self.image_word(ctx.mean), ctx), state)
        return state

    def step(self, tokens: torch.Tensor, state: State, ctx: Context) -> tuple[torch.Tensor, State]:
        state = self.cell(self._input(self.dropout(self.embed(tokens)), ctx), state)
        return self.out(self.dropout(state[0])), state


class ShowAttTell(CaptionDecoder):
    family = "showatttell"

    def __init__(self, cfg: DecoderConfig, vocab_size: int, grid_dim: int, trait_slots: int) -> None:
        super().__init__(cfg, vocab_size, grid_dim, trait_slots)
        self.cell = Cell(cfg.cell, cfg.embed_dim + cfg.feature_dim + self.trait_dim, cfg.hidden_dim)
        self.attention = Attention(cfg.feature_dim, cfg.hidden_dim, cfg.attention_dim)
        self.gate = nn.Linear(cfg.hidden_dim, cfg.feature_dim)
        self.init = nn.Linear(cfg.feature_dim, self.cell.state_size * cfg.hidden_dim)
        self.trait_init = self._trait_init(self.cell)
        self.out = nn.Linear(cfg.hidden_dim + cfg.feature_dim, vocab_size)

    def prepare(self, grid: torch.Tensor, trait_ids: torch.Tensor) -> Context:
        cells = self.project(grid)
        return Context(mean=cells.mean(dim=1), cells=cells, keys=self.attention.key(cells),
                       trait=self._trait(trait_ids))

    def initial_state(self, ctx: Context) -> State:
        return self._init_from(self.init, self.trait_init, ctx.mean, ctx, self.cell)

    def step(self, tokens: torch.Tensor, state: State, ctx: Context) -> tuple[torch.Tensor, State]:
        context, _ = self.attention(ctx.keys, ctx.cells, state[0])
        context = torch.sigmoid(self.gate(state[0])) * context  # Show, Attend and Tell's gating scalar beta
        state = self.cell(self._with_trait([self.dropout(self.embed(tokens)), context], ctx), state)
        return self.out(self.dropout(torch.cat([state[0], context], dim=-1))), state


class UpDown(CaptionDecoder):
    family = "updown"

    def __init__(self, cfg: DecoderConfig, vocab_size: int, grid_dim: int, trait_slots: int) -> None:
        super().__init__(cfg, vocab_size, grid_dim, trait_slots)
        hidden = cfg.hidden_dim
        self.att_cell = Cell(cfg.cell, hidden + cfg.feature_dim + cfg.embed_dim + self.trait_dim, hidden)
        self.lang_cell = Cell(cfg.cell, cfg.feature_dim + hidden, hidden)
        self.attention = Attention(cfg.feature_dim, hidden, cfg.attention_dim)
        self.att_trait_init = self._trait_init(self.att_cell)
        self.lang_trait_init = self._trait_init(self.lang_cell)
        self.out = nn.Linear(hidden, vocab_size)

    def prepare(self, grid: torch.Tensor, trait_ids: torch.Tensor) -> Context:
        cells = self.project(grid)
        return Context(mean=cells.mean(dim=1), cells=cells, keys=self.attention.key(cells),
                       trait=self._trait(trait_ids))

    def initial_state(self, ctx: Context) -> State:
        att = self._init_from(None, self.att_trait_init, None, ctx, self.att_cell)
        lang = self._init_from(None, self.lang_trait_init, None, ctx, self.lang_cell)
        return (*att, *lang)

    def step(self, tokens: torch.Tensor, state: State, ctx: Context) -> tuple[torch.Tensor, State]:
        split = self.att_cell.state_size
        att, lang = state[:split], state[split:]
        att = self.att_cell(self._with_trait([lang[0], ctx.mean, self.dropout(self.embed(tokens))], ctx), att)
        attended, _ = self.attention(ctx.keys, ctx.cells, att[0])
        lang = self.lang_cell(torch.cat([attended, att[0]], dim=-1), lang)
        return self.out(self.dropout(lang[0])), (*att, *lang)


DECODERS: dict[str, type[CaptionDecoder]] = {cls.family: cls for cls in (ShowTell, ShowAttTell, UpDown)}


def create_decoder(family: str, cfg: DecoderConfig, *, vocab_size: int, grid_dim: int,
                   trait_slots: int) -> CaptionDecoder:
    """The decoder of ``family``; ``trait_slots`` 0 builds it without a personality input."""
    if family not in DECODERS:
        raise ValueError(f"model.family {family!r} is not a caption generator (one of {', '.join(DECODERS)})")
    return DECODERS[family](cfg, vocab_size, grid_dim, trait_slots)
