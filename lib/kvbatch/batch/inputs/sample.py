"""Synthetic candidate-screening batches, the shape of the original workload: a criteria system prompt of about
2,400 tokens, user messages of about 600 tokens, answers of up to about 300 tokens. Deterministic per seed."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROLES = [
    "backend engineer",
    "data analyst",
    "site reliability engineer",
    "product designer",
    "ML engineer",
    "security engineer",
    "technical writer",
    "QA engineer",
    "mobile developer",
    "data engineer",
]
SKILLS = [
    "Python",
    "Go",
    "Rust",
    "SQL",
    "Kubernetes",
    "Terraform",
    "React",
    "TypeScript",
    "Spark",
    "Airflow",
    "PyTorch",
    "pandas",
    "PostgreSQL",
    "Kafka",
    "AWS",
    "GCP",
    "Linux",
    "CI/CD",
    "observability",
    "Figma",
    "accessibility",
    "threat modelling",
    "Swift",
    "Kotlin",
    "dbt",
    "statistics",
    "A/B testing",
]
FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Leslie",
    "Margaret",
    "Dennis",
    "Hedy",
    "Tim",
    "Sophie",
    "Linus",
    "Katherine",
    "John",
    "Shafi",
    "Yukihiro",
]
LAST = [
    "Okafor",
    "Nakamura",
    "Silva",
    "Novak",
    "Haddad",
    "Kowalski",
    "Fischer",
    "Moreau",
    "Larsen",
    "Ivanova",
    "Mensah",
    "Park",
    "Rossi",
    "Dubois",
    "Kumar",
    "Andersen",
    "Costa",
    "Yilmaz",
    "Walsh",
    "Tanaka",
]
VERBS = ["led", "built", "migrated", "designed", "maintained", "scaled", "automated", "rewrote", "monitored", "tested"]
THINGS = [
    "a billing pipeline",
    "the search service",
    "an internal analytics platform",
    "a fraud detection model",
    "the mobile checkout flow",
    "a multi-region Kubernetes cluster",
    "the data warehouse",
    "an on-call rotation",
    "a design system",
    "the public API",
    "a feature store",
    "the release process",
]

CRITERIA_TOPICS = [
    ("Relevant experience", "years of hands-on work in the role's core duties, weighted toward the last five years"),
    ("Technical depth", "evidence of understanding systems below the surface: trade-offs named, failures analysed"),
    ("Impact", "measurable outcomes: latency, cost, revenue, reliability, users served, with numbers where given"),
    ("Ownership", "projects carried from proposal to production and maintained afterwards"),
    ("Collaboration", "work across teams, mentoring, reviews, and written communication"),
    ("Learning", "new tools or domains picked up quickly, with a concrete example"),
    ("Role fit", "overlap between the candidate's recent work and the posted role's first-year goals"),
    ("Seniority signal", "scope of decisions, size of systems, and autonomy described"),
    ("Red flags", "unexplained gaps are NOT red flags; vague claims without outcomes, or tool lists without use, are"),
    ("Fairness", "ignore name, age, gender, nationality, school prestige and employment gaps entirely"),
]


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "decision": {"type": "string", "enum": ["advance", "hold"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 5},
        "strongest_criterion": {"type": "string", "enum": [title for title, _ in CRITERIA_TOPICS]},
        "red_flags": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 240},
    },
    "required": ["decision", "score", "strongest_criterion", "red_flags", "summary"],
    "additionalProperties": False,
}
"""The decision a program reads from each screening answer (the shipped sample asks for it)."""

_TEXT_FORMAT = (
    "\nOutput format: first line 'DECISION: advance' or 'DECISION: hold'. Then one line per criterion as "
    "'<number>. <title>: <score>/5 - <one sentence of evidence>'. End with 'SUMMARY:' and two sentences.\n"
)
_JSON_FORMAT = (
    "\nOutput format: one JSON object and nothing else, with `decision` (advance or hold), `score` (0-5 overall), "
    "`strongest_criterion` (the title of the criterion best met), `red_flags` (true or false) and `summary` (two "
    "short sentences).\n"
)


def system_prompt(target_tokens: int = 2400, seed: int = 7, *, json_answer: bool = False) -> str:
    """The screening criteria: the long, byte-identical prefix every request shares."""
    rng = random.Random(seed)
    parts = [
        "You are a careful, fair screening assistant for a hiring team. You read one candidate summary at a time and "
        "score it against the criteria below. Answer in the format given at the end, and nothing else.\n",
    ]
    section = 0
    while sum(len(p) for p in parts) < target_tokens * 4:
        section += 1
        title, text = CRITERIA_TOPICS[(section - 1) % len(CRITERIA_TOPICS)]
        detail = " ".join(
            f"Consider {rng.choice(SKILLS)} work where it shows {rng.choice(['judgement', 'rigour', 'care', 'speed'])}"
            f" on {rng.choice(THINGS)}."
            for _ in range(6)
        )
        parts.append(
            f"\nCriterion {section}: {title}. Score 0-5 for {text}. {detail} A score of 5 needs two or more "
            f"independent examples; 3 means adequate; 1 means a claim without evidence; 0 means absent.\n"
        )
    parts.append(_JSON_FORMAT if json_answer else _TEXT_FORMAT)
    return "".join(parts)


def candidate_message(rng: random.Random, target_tokens: int = 600) -> str:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    role = rng.choice(ROLES)
    lines = [f"Candidate: {name}", f"Applying for: {role}", f"Years of experience: {rng.randint(1, 20)}", "Experience:"]
    while sum(len(line) for line in lines) < target_tokens * 4:
        lines.append(
            f"- {rng.randint(2008, 2026)}: {rng.choice(VERBS)} {rng.choice(THINGS)} using {rng.choice(SKILLS)} and "
            f"{rng.choice(SKILLS)}; {rng.choice(['cut', 'raised', 'kept', 'halved'])} "
            f"{rng.choice(['latency', 'cost', 'error rate', 'throughput', 'on-call pages'])} by {rng.randint(5, 80)}%."
        )
    lines.append(f"Skills listed: {', '.join(rng.sample(SKILLS, 8))}.")
    lines.append("Score this candidate.")
    return "\n".join(lines)


def write_sample(
    path: Path, n: int, *, seed: int = 1, max_tokens: int = 300, system_tokens: int = 2400, user_tokens: int = 600,
    json_answer: bool = False,
) -> Path:
    """Write `n` requests in the OpenAI Batch format, streaming (any n fits in memory). With `json_answer` each asks
    for `ANSWER_SCHEMA` (`response_format`), as the shipped sample does."""
    rng = random.Random(seed)
    system = system_prompt(system_tokens, json_answer=json_answer)
    response_format = {"type": "json_schema", "json_schema": {"name": "screening", "schema": ANSWER_SCHEMA}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(n):
            record = {
                "custom_id": f"candidate-{index:06d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": candidate_message(rng, user_tokens)},
                    ],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    **({"response_format": response_format} if json_answer else {}),
                },
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
