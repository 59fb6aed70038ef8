"""Every default kvbatch uses, in one place, each with the reason it has that value.

The CLI, the notebooks' `parameters` cells and the library read these names; nothing else spells the numbers.
"""

from __future__ import annotations

from pathlib import Path

# ---- where things go ---------------------------------------------------------------------------------------------
RUNS_DIR = Path("data/runs")
"""One folder per run (`--run NAME`), relative to where kvbatch is started, as `make batch` does from the repo."""
MEASUREMENTS_DIR = Path("data/measurements")
"""Measurement result files, named by backend, model and KV cache types (see measure/result.py)."""
REPORTS_DIR = Path("reports")
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
"""The notebooks of the checkout kvbatch is installed from (editable), wherever kvbatch is started."""
SAMPLE_INPUT = Path("data/sample/requests.jsonl")
KERNEL_START_TIMEOUT_S = 300.0
"""How long a report's notebook kernel may take to start (papermill's own limit is 60 s): importing pandas and
matplotlib on a busy, slow 2-core machine can take most of a minute."""

# ---- the embedded server -----------------------------------------------------------------------------------------
CONTEXT_TOKENS = 4096
"""Context of a server started without a plan (`kvbatch serve`): Ollama's own default on cards under 23 GiB."""
CONTEXT_ALIGN_TOKENS = 256
"""Planned contexts are multiples of this: llama.cpp pads its caches to 256 cells, so other sizes buy nothing."""
UBATCH_TOKENS = 512
"""llama.cpp's default micro-batch; the sliding-window cache holds window + this many cells per slot."""
SERVING_ALLOWANCE_PER_SLOT_BYTES = 2 * 2**20
"""What a serving llama-server holds per slot beyond what `ServingMemory` prices (the HTTP threads' allocator
arenas, per-slot state): measured at 0.6-1.6 MiB per slot on the 270M at 1, 4 and 8 slots (tools/plan_bound.py; one
run at 4 slots peaked 2.4 MiB above a 1 MiB allowance)."""
JSON_ANSWER_BYTES_PER_VOCAB_TOKEN = 680
JSON_ANSWER_BYTES_PER_SLOT = 2 * 2**20
"""What llama-server holds more once it serves answers constrained by a JSON schema (its grammar sampler walks the
whole vocabulary for each token, and the allocator keeps the high-water mark): measured by bench/json_soak.py on
the 270M (vocabulary 262,144), 163 MiB above the free-text plan at 1 slot and 167 MiB at 4, reached with the first
answers and flat after: about 680 bytes per vocabulary entry once per server, and a little per slot."""
CTX_CHECKPOINTS = 3
"""Context checkpoints per slot (llama-server's default is 32). On a sliding-window model each is a copy of the
slot's window cache, made at the start of the user message (the one a shared prefix is restored from) and twice
near the prompt's end; 32 of them grew the 270M server by 46 % over a 40-request run on 4 slots. Three keep the
prefix-cache hits (the checkpoint at the system prompt's end is re-made by every request) at a bounded cost,
which the plan prices."""
CACHE_RAM_MIB = 0
"""llama-server's host-RAM prompt cache (its default is 8 GiB) is off: slot pinning keeps each slot's prefix warm
without it, and memory stays what the plan prices."""
SERVER_THREADS_ENV = "KVBATCH_SERVER_THREADS"
"""The environment variable that sets the threads of every embedded server started without `--threads`: to leave
cores to other work, or to hold the test suite's servers to a slow machine's speed (`tools/slow_suite.py`)."""
STARTUP_TIMEOUT_S = 180.0
"""Loading a 12B model from a cold disk can take a minute or two; the 270M loads in about 1.5 s here."""
MALLOC_ARENA_MAX = 1
"""One malloc arena for the server: each extra glibc arena reserves 64 MiB of address space lazily, which made the
point where an address-space cap bites move between runs; with one it is the same 4 times out of 4."""
CAPPED_STACK_BYTES = 1 << 20
"""Thread stacks under an address-space cap: every thread's default 8 MiB reservation counts against the cap."""

# ---- memory and planning -----------------------------------------------------------------------------------------
SAFETY_MARGIN = 0.8
"""Safe context = largest context that loaded and served x this. Applied once, always downward."""
GPU_BUDGET_SHARE = 0.9
"""On a GPU the default budget is the card's memory x this, minus what other processes hold: the driver, the
CUDA context and fragmentation need the rest."""
DEMO_BUDGET = "+24MiB"
"""`make measure`'s budget on a 2-core machine: the model's own need plus 24 MiB, so every fitting probe (which
prefills its whole context at about 250 tokens/s) stays quick. A demo: it never overrides a user's budget."""
MAX_SLOTS = 16
"""Most parallel slots a plan uses unless asked: beyond 16 a 16 GB card spends more on sliding-window caches
(per slot) than it gains in throughput."""
MIN_REQUESTS_PER_SLOT = 4
"""A slot pays the system prompt once; a plan gives each slot at least this many requests, or the prefill of
extra slots costs more than their parallelism gains."""
DEFAULT_MAX_TOKENS = 512
"""Sent as `max_tokens` for a request that sets none, and used to size its slot: an unbounded answer could fill
the slot's whole context."""
CHAT_TEMPLATE_TOKENS_PER_MESSAGE = 8
"""Role markers and separators a chat template adds per message (Gemma: <start_of_turn>user\\n ... <end_of_turn>)."""
CONTEXT_HEADROOM = 1.05
"""A slot is sized 5 % above the largest (p99) request, for the estimate's error."""
SIZE_SAMPLE = 20
"""User messages tokenized exactly to calibrate characters per token for the rest of the input."""
KV_TYPES_AUTO = ("f16", "q8_0")
"""The KV cache types `--kv-type auto` compares: q8_0 halves the cache with no measurable quality loss on Gemma;
q4_0 costs answer quality, so it is only used when asked for."""

# ---- running a batch ---------------------------------------------------------------------------------------------
REQUEST_TIMEOUT_S = 600.0
"""One request's limit: a 300-token answer on a busy 2-core CPU takes under a minute; ten is a hung server."""
MAX_WAIT_S = 1800.0
"""How long transient failures (503, refused connections, timeouts) are waited out before the run stops: a
server restart or a model reload takes minutes, never half an hour."""
MAX_ATTEMPTS = 2
"""Crashes a request may cause while sent alone before it fails for good: twice alone is proof it is the cause
(a request in flight during two crashes is only a suspect, and is then sent alone)."""
ANSWER_ATTEMPTS = 4
"""Answers asked for per request whose `response_format` asks for JSON, until one keeps to it (`--answer-attempts`):
at a 20 % invalid rate, 0.2^4 = 0.16 % fail for good. Its own budget: an invalid answer is not a crash."""
ANSWER_RETRY_TEMPERATURE = 0.7
"""The temperature an invalid answer is asked again at when its request had none: greedy decoding gives the same
answer whatever the seed."""
ANSWERS_TABLE_AT_END_MAX_ROWS = 20_000
"""`kvbatch run` writes the answers' table (and their counts) itself at its end up to this many rows: pandas holds
about 3.2 KiB a row (548 MiB for 170,000), which would pass the executor's own memory bound (bench/stress.py:
< 200 MB); a larger run is told the `kvbatch export` line (a process of its own), and its report charts them."""
MAX_SERVER_FAULTS = 4
"""Server faults (5xx, a timeout, a dropped connection while the server stays up) one request may meet while the
server answers others before it fails for good: a random 1 % of dropped connections hits one request four times in
a row once in 100 million, a request the server cannot serve does so every time. On a server that fails more of
everyone's attempts, more are needed (BY_CHANCE_ODDS)."""
AMBIENT_FAULT_RATE_FLOOR = 0.01
"""The least fault rate a server is taken to have, for the odds that one request's faults were chance."""
BY_CHANCE_ODDS = 1e-8
"""A request fails for good only once its faults in a row are no likelier than this to be chance at the server's
own fault rate: 4 at 1 %, 17 when a third of all attempts fail (a proxy dropping connections), while a request
the server cannot serve fails every time and meets it as soon as the others are served."""
POOL_GRACE_S = 5.0
"""In a pool, a server someone else runs that is not healthy within this long is taken out (the others carry on)
and probed with back-off until it is back. Servers we start (embedded, Ray actors) are restarted instead."""
BREAKER_REQUESTS = 4
"""Different requests that fail in a row on one server (5xx, timeouts, dropped connections while it stays up) with
nothing served in between before the fault is taken to be the server's: a wedged server answers 500 to every
request while /health says ok, and would otherwise burn the input a request at a time."""
BREAKER_ATTEMPTS = 8
"""Failed attempts in a row with nothing served that trip the breaker even when fewer than BREAKER_REQUESTS different
requests are left to fail (the tail of a batch)."""
PROBE_BODY = {"messages": [{"role": "user", "content": "Reply with OK."}], "max_tokens": 1}
"""The chat request that asks a server whether it serves at all (/health says ok on a wedged server)."""
RETRY_LATER_PAUSE_S = 2.0
"""The most a worker pauses before handing a failed request back for later (jittered back-off from 0.5 s)."""
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
CONCURRENCY_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""In-flight counts `--concurrency auto` tries (with the plan's own slot count), up to the server's slots, stopping
when the steady rate stops improving by 5 %."""
UNKNOWN_SERVER_FIRST_TRIAL = 4
"""The first in-flight count tried on a server that does not say its slots: one that batches serves 4 at least as
fast as 1, and a trial at 1 is the longest of the climb (a request at a time), about 5 % of a 3,000-request run."""
POOLED_UNKNOWN_SLOTS = 8
"""In flight on each server of a pool that does not say its slots (the trials run for a single server only): a
serial server then queues 8, never hundreds that would time out."""
UNKNOWN_SERVER_SLOTS = 256
"""The most requests in flight tried on a server that does not say how many it runs at once (vLLM, SGLang, LM Studio,
Ollama's /v1): continuous batching runs dozens at once, so the run measures instead of assuming one."""
TRIAL_REQUESTS_PER_SLOT = 2
"""Requests per slot in each concurrency trial, started once every slot is warm (the warm-up is not counted)."""
FSYNC_EVERY_RESULTS = 32
"""Result lines between fsyncs (and at least once per conversation chunk): a kill loses no whole line, a power
cut at most this many."""
FEED_LOOKAHEAD = 64
"""Requests the feed reads ahead, so a worker can prefer the prefix its slot already holds when several are in play."""
CHUNK_CONTEXT_SHARE = 0.95
"""Conversation mode: a chunk ends before a turn would take it past this share of the slot's context."""
TURN_CHARS_PER_TOKEN = 3
"""Conversation mode's estimate of a turn's tokens before the server counts it: a generous 3 characters a token (a
turn estimated short would overflow the slot; one estimated long only ends the chunk a turn early)."""
TURN_OVERHEAD_TOKENS = 16
"""The chat template's tokens around one turn (role markers, separators), added to each turn's estimate."""
PREFIX_HIT_SHARE = 0.9
"""A request whose cached tokens cover less than this share of its system prompt counts as a prefix-cache miss."""
CONCURRENCY_IMPROVEMENT = 1.05
"""A concurrency trial's count must beat the best so far by 5 % to be kept: on 2 CPU cores the trials stop after 2."""
MEMORY_THRESHOLD_OF_BUDGET = 0.95
"""With --memory-budget and no --memory-threshold, the run reacts when the server passes this share of the budget."""
MEMORY_SAMPLE_S = 1.0
RESTART_ABOVE_PLAN = 0.10
RESTART_ABOVE_PLAN_MIN_BYTES = 64 * 2**20
"""Our own server is drained (its requests in flight finish, no new ones start) and restarted when its memory passes
the plan's peak by this share, at least this many bytes (--restart-above overrides): what the plan could not price
(a JSON schema's grammar state, a leak in the server) is let go long before the kernel's out-of-memory killer."""
RESTART_MIN_REQUESTS_PER_SLOT = 4
"""Before the next drain-and-restart the restarted server must serve this many requests per slot: memory past the
bound sooner means the plan itself is short (not a leak), and the in-flight count is lowered instead, for good."""
PROGRESS_LOG_EVERY_S = 15.0
"""A plain progress line this often when output is not a terminal (CI, logs)."""
KEEP_ALIVE = "30m"
"""Ollama's keep_alive on every request: long enough that a pause in the batch does not unload the model."""
TRUNCATION_TOLERANCE = 0.10
"""A reply whose prompt token count is more than this share below the request's known size was truncated."""
ESTIMATE_REFRESH_S = 120.0
"""The time estimate is re-made from the run's own rate after this long (and the progress ETA uses it)."""

# ---- sustained load ----------------------------------------------------------------------------------------------
SUSTAINED_DRIFT_SHARE = 0.01
SUSTAINED_DRIFT_BYTES = 64 * 2**20
"""Sustained load fails on memory drift over the second half above max(1 %, 64 MiB): allocator noise on a
CPU server is a few MiB, a leak or unbounded checkpoints grow by hundreds."""
SUSTAINED_DURATION_S = 60.0
"""The least time a sustained load runs; it runs longer until every slot has served its context once."""
SUSTAINED_MIN_REQUESTS_PER_SLOT = 2
"""Requests each slot serves at least: the second one reuses the slot's prefix cache and makes its checkpoints,
which is where memory grows after load."""
SUSTAINED_CEILING_S = 3600.0
"""The most a sustained load runs: a 4.5x slower 2-core machine fills 4 slots of the sample in under 10 minutes;
a load the ceiling stops before every slot was filled does not pass."""
SUSTAINED_INTERVAL_S = 15.0

# --- the embedded server's log, Ray, token sizes, the truncation guard
KEPT_AFTER_LISTENING = 64
"""Per-request lines kept in a server's log once it listens, of the kinds the log's readers use (checkpoint sizes):
the first few tell the size; more only grow the file."""
TAIL_LINES = 200
"""The last lines the server printed, kept in memory and written to its log when it exits: what it said before
dying."""
ACTOR_RESTARTS = 3
"""How many times Ray restarts a dead server actor (its requests are retried on the restarted one)."""
PROBE_SPEED_PROMPT_TOKENS = 512
PROBE_SPEED_ANSWER_TOKENS = 32
"""The probe server's timed request (a prompt of 512 tokens, 32 generated), after one untimed request of the same
prompt that pages the weights in (on a fresh clone the first request's speeds were 0.7 of the run's: 490 prompt and
43 answer tokens/s against 661 and 62 warm): its speeds estimate a run's time before any measurement."""
PROBE_CONTEXT = 1024
"""The context of the short-lived server that tokenizes the batch and weighs the model before any KV cache."""
FALLBACK_CHARS_PER_TOKEN = 4.0
"""Characters per token where no tokenizer is at hand (OpenAI's rule of thumb for English)."""
GENEROUS_CHARS_PER_TOKEN = 6.0
"""The truncation guard's ratio before any calibration: a prompt counted below what even 6 characters per token
allows was cut (the guard must not fire on estimation error)."""
CALIBRATION_REPLIES = 8
"""Replies whose prompt counts calibrate the truncation guard (their median: one cut reply cannot move it)."""
FILL_ATTEMPTS = 6
"""Sends of one measurement fill on a server counted by words (Ollama): the first sizes it by what is known, the next
by the server's own count of the one before; a refusal that names no count halves the words, so a tokenizer at up
to 3 tokens a word unknown beforehand is filled in 4, with 2 to spare."""
FILL_MIN_WORDS = 16
"""Fills shorter than this teach nothing of a server's tokens per word (the BOS token and template dominate)."""
OLLAMA_INFER_CONTEXT = 2048
"""The num_ctx Ollama is loaded at to read its size when it holds no model yet (its slots and cache type are then
inferred from the size at 4x that)."""
OLLAMA_INFER_TIE = 0.03
"""Inferred settings within 3 % of the best fit are a tie, won by f16 and the fewest slots (q8_0 at twice the slots
predicts 6 % more than f16)."""
OLLAMA_INFER_MIN_CONTEXT = 512
"""The smallest num_ctx loaded to compare Ollama's sizes."""
MAX_CONNECTIONS = 256
"""Connections a backend opens to one server at most: the most requests in flight the concurrency trials try
(UNKNOWN_SERVER_SLOTS); below that a trial's extra requests would wait for a connection, on the request's clock."""
RAY_SHUTDOWN_S = 30.0
"""How long a Ray actor is given at the run's end to stop its server and remove its logs before it is killed."""

API_DATA_DIR = Path("data/api")
"""`kvbatch api --data`: its SQLite store, uploaded files, and each batch's run folder."""
API_PORT = 8321
API_COUNT_EVERY_S = 1.0
"""How often a running batch's request_counts are read from its journal and saved."""
API_RETRY_PAUSE_S = 30.0
"""After a batch's run stopped (its servers gone past --max-wait), the pause before it is taken up again."""
API_MAX_TROUBLES = 3
"""Unexpected failures of one batch's run (not its servers being gone) before it is failed, so the queue goes on."""
API_PAGE_REFRESH_S = 2
"""The status page reloads itself this often (seconds)."""
API_PAGE_FAILURES = 20
"""The status page lists a batch's first this many failed requests with their reasons (all are in its error file)."""
API_THROUGHPUT_POINTS = 120
"""A batch keeps at most this many (time, requests done) points for the page's throughput chart: past it, every
other point is dropped, so the chart covers the whole run at a coarser step."""
API_PAGE_DELIVERIES = 200
"""The status page counts and lists the newest this many webhook deliveries."""
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_FIRST_DELAY_S = 1.0
"""Webhook deliveries are retried with back-off doubling from this (1, 2, 4, ... s), in the background..."""
WEBHOOK_MAX_DELAY_S = 1800.0
"""...up to this between attempts (a receiver down for a day is tried about every half hour)..."""
WEBHOOK_GIVE_UP_S = 72 * 3600.0
"""...until the event is this old: OpenAI retries a failed delivery with back-off for up to 72 hours."""
