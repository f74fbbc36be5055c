"""Writes the router's training pairs and its in-distribution eval set (both from this generator).

    python assets/router/generate.py      # writes train.jsonl and eval_in_distribution.jsonl here

Labels follow NPC Fast's routing policy: escalate to npc_fin only when a request is about
finance AND needs multi-step quantitative work or deep domain knowledge AND a short answer would
be superficial. Everything else stays with the router (`self`), including the hard cases:
finance that is simple, heavy maths that is not finance, long documents that are not finance,
tool calls, translation, code and chit-chat. ood.jsonl is NOT made here: it was written by hand,
apart from these templates, so that it measures generalization.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

COMPANIES = [
    "Tesla",
    "Apple",
    "Nvidia",
    "a mid-size regional bank",
    "Coca-Cola",
    "a SaaS startup with $40M ARR",
    "Siemens",
    "Unilever",
    "a utility company",
    "Netflix",
    "a family-owned logistics firm",
    "Toyota",
    "Shopify",
    "a REIT focused on warehouses",
    "Pfizer",
    "an airline emerging from restructuring",
]
TERMS = [
    "APR",
    "a dividend",
    "a bond coupon",
    "market capitalization",
    "an ETF",
    "compound interest",
    "inflation",
    "a stock split",
    "liquidity",
    "a credit score",
    "a mutual fund",
    "a bear market",
    "an IPO",
    "a 401(k)",
    "a savings account",
    "an index fund",
    "a balance sheet",
    "EBITDA",
    "a margin call",
    "a P/E ratio",
]
CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Toronto", "Mumbai", "Sydney", "Cairo", "Denver"]
LANGS = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese", "Korean", "Dutch"]
PHRASES = [
    "Where is the train station?",
    "I would like a cup of coffee, please.",
    "The meeting moved to Friday.",
    "Thank you for your help yesterday.",
    "My flight was delayed by two hours.",
    "Please close the window.",
]
CODE_TASKS = [
    "reverses a linked list",
    "checks whether a string is a palindrome",
    "parses an ISO date",
    "merges two sorted lists",
    "counts word frequencies in a file",
    "retries an HTTP call with backoff",
    "flattens a nested list",
    "validates an email address with a regex",
]
ANIMALS = ["penguins", "cats", "octopuses", "giraffes", "owls", "dogs"]
SCIENCE = [
    "Mitochondria produce most of the cell's ATP through oxidative phosphorylation.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War.",
    "Plate tectonics explains the distribution of earthquakes and volcanoes.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Roman aqueducts carried water over long distances using gravity alone.",
    "Neurons communicate through chemical signals released at synapses.",
    "The printing press spread literacy across Europe in the fifteenth century.",
    "Glaciers carve U-shaped valleys as they slowly move downhill.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The migration of monarch butterflies spans several generations.",
]
FIN_DOC = [
    "Revenue grew 14% year over year to $8.2B while gross margin contracted from 41% to 37%.",
    "Net debt rose to $5.1B after the acquisition, lifting net debt to EBITDA to 3.4x.",
    "Operating cash flow fell 9% as inventories built up ahead of the product transition.",
    "The company refinanced $1.5B of notes due 2027 at a coupon 180 basis points higher.",
    "Management guided to flat margins next year, citing wage inflation and FX headwinds.",
    "Capital expenditures reached 11% of sales, above the five-year average of 7%.",
    "The current ratio declined from 1.6 to 1.1 as short-term borrowings increased.",
    "Share repurchases of $2B were funded partly by the new term loan.",
]

SELF_TEMPLATES: dict[str, tuple[list[str], str]] = {
    "simple_finance": (
        [
            "What is {term}?",
            "Define {term} in one sentence.",
            "Can you explain {term} briefly?",
            "In simple words, what does {term} mean?",
        ],
        "simple finance definition",
    ),
    "one_step_arithmetic": (
        [
            "If I buy {n} shares at ${p} each, how much do I pay?",
            "What is {pct}% of ${amt}?",
            "A ${amt} dinner with a {pct}% tip comes to how much?",
            "I earn ${amt} a month and save {pct}%. How much do I save?",
        ],
        "one-step arithmetic",
    ),
    "heavy_math": (
        [
            "Prove that the square root of {k} is irrational.",
            "Find the eigenvalues of the matrix [[{a}, {b}], [{b}, {c}]].",
            "Compute the integral of x^{k} * e^x from 0 to 1 and show every step.",
            "How many ways can the letters of the word MISSISSIPPI be arranged? Explain.",
            "Solve the recurrence T(n) = 2T(n/2) + n log n.",
        ],
        "math, not finance",
    ),
    "long_document": (
        [
            "Summarize this passage in three bullet points: {doc}",
            "Here is some text: {doc} What is the main idea?",
            "Rewrite the following for a ten-year-old: {doc}",
        ],
        "summary of a non-finance text",
    ),
    "tool_call": (
        [
            "Call get_weather for {city} and tell me if I need an umbrella.",
            "Use the calendar tool to book a meeting with Sam on Tuesday at {h}pm.",
            "Search the web for the opening hours of the museum in {city}.",
            "Set a reminder for {h}:00 to call the dentist.",
        ],
        "tool call with obvious arguments",
    ),
    "translation": (["Translate '{phrase}' into {lang}.", "How do you say '{phrase}' in {lang}?"], "translation"),
    "chitchat": (
        [
            "Hi! How is your day going?",
            "Tell me a joke about {animal}.",
            "What's a fun fact about {animal}?",
            "I'm bored, suggest something to do this weekend.",
            "Good morning!",
        ],
        "chit-chat",
    ),
    "code": (
        [
            "Write a Python function that {task}.",
            "Show me a short JavaScript snippet that {task}.",
            "Review this idea: a function that {task}. Any pitfalls?",
        ],
        "short code task",
    ),
    "identity": (
        ["Who are you?", "What model am I talking to?", "Can you route requests to other models?"],
        "identity question",
    ),
    "format": (
        [
            "Convert this CSV to JSON: name,age\\nAna,{n}\\nBo,{k}",
            "Turn this list into a markdown table: {city}, {lang}, {animal}",
        ],
        "format conversion",
    ),
}
FIN_TEMPLATES: dict[str, tuple[list[str], str]] = {
    "valuation": (
        [
            "Build a DCF for {company} with {k} scenarios and a terminal growth rate of {g}%.",
            "Value {company} with comparable multiples and reconcile the result with a DCF.",
            "Estimate the intrinsic value per share of {company} given a WACC of {w}% and explain the drivers.",
        ],
        "multi-step valuation",
    ),
    "derivatives": (
        [
            "Price a European call with S={s}, K={kk}, r={r}%, volatility {v}%, T={t} years using "
            "Black-Scholes, then compute delta, gamma and vega.",
            "Design a collar on {company} stock for a client holding {n} shares and quantify the payoff "
            "at three price levels.",
            "How should I delta-hedge a short straddle on {company} as implied volatility moves?",
        ],
        "derivatives math",
    ),
    "portfolio": (
        [
            "Given monthly returns of {r}% and volatility of {v}%, compute the Sharpe ratio, the max "
            "drawdown over a {k}-year backtest and propose a rebalancing rule.",
            "Optimize a portfolio of equities, bonds and gold under mean-variance with a {v}% volatility "
            "cap and explain the weights.",
            "Compare a 60/40 portfolio with risk parity over the last {k} rate cycles and quantify the "
            "difference in drawdowns.",
        ],
        "portfolio analysis",
    ),
    "risk": (
        [
            "Estimate the one-day 99% VaR and expected shortfall of a ${amt} position in {company} stock.",
            "Use the Merton model to estimate {company}'s probability of default from its equity volatility of {v}%.",
            "Stress-test a bank's loan book for a {g}% rise in unemployment and estimate the capital hit.",
        ],
        "risk modelling",
    ),
    "long_fin_document": (
        [
            "Here are excerpts from {company}'s annual report: {fdoc} Analyze margins, leverage and "
            "liquidity trends and give an investment view.",
            "Read this earnings summary and build a bull and bear case with numbers: {fdoc}",
        ],
        "long financial document synthesis",
    ),
    "lbo": (
        [
            "Model an LBO of {company} at {k}x EBITDA with {w}% debt and estimate the equity IRR over five years.",
            "Would an acquisition of {company} be accretive to EPS if financed with {w}% debt at {r}%? Walk "
            "through the math.",
        ],
        "deal modelling",
    ),
    "fixed_income": (
        [
            "Compute the Macaulay duration and convexity of a {k}-year {r}% bond yielding {g}%, then "
            "estimate the price change for a +{bp}bp shift.",
            "Build a bond ladder for ${amt} across {k} years and compare its yield and rate risk with a barbell.",
        ],
        "fixed-income math",
    ),
}
OPENERS = ["", "", "", "Quick question: ", "Hey, ", "I need help. ", "Please: ", "Can you help? "]
CLOSERS = ["", "", "", " Thanks!", " Be concise.", " Please show your work.", " Keep it short."]


def _fill(template: str, rng: random.Random) -> str:
    doc_len = rng.randint(3, 7)
    values = {
        "term": rng.choice(TERMS),
        "n": rng.randint(2, 500),
        "p": rng.randint(5, 900),
        "pct": rng.choice([5, 8, 10, 12, 15, 18, 20, 25]),
        "amt": rng.choice([40, 120, 2500, 5000, 10000, 250000]),
        "k": rng.randint(2, 12),
        "a": rng.randint(1, 9),
        "b": rng.randint(1, 9),
        "c": rng.randint(1, 9),
        "doc": " ".join(rng.sample(SCIENCE, doc_len)),
        "city": rng.choice(CITIES),
        "h": rng.randint(1, 11),
        "phrase": rng.choice(PHRASES),
        "lang": rng.choice(LANGS),
        "animal": rng.choice(ANIMALS),
        "task": rng.choice(CODE_TASKS),
        "company": rng.choice(COMPANIES),
        "g": rng.choice([1, 2, 2.5, 3, 4]),
        "w": rng.choice([6, 7, 8, 9, 10, 60, 70]),
        "s": rng.randint(80, 200),
        "kk": rng.randint(80, 200),
        "r": rng.choice([1, 2, 3, 4.5, 5]),
        "v": rng.choice([15, 20, 25, 30, 45]),
        "t": rng.choice([0.25, 0.5, 1, 2]),
        "bp": rng.choice([25, 50, 100, 200]),
        "fdoc": " ".join(rng.sample(FIN_DOC, rng.randint(3, 6))),
    }
    return template.format(**values)


def _pairs(
    templates: dict[str, tuple[list[str], str]], route: str, count: int, rng: random.Random, seen: set[str]
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    kinds = list(templates)
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"cannot make {count} distinct {route} prompts")
        kind = kinds[len(out) % len(kinds)] if rng.random() < 0.7 else rng.choice(kinds)
        phrasings, reason = templates[kind]
        text = rng.choice(OPENERS) + _fill(rng.choice(phrasings), rng) + rng.choice(CLOSERS)
        if rng.random() < 0.15:
            text = text.lower()
        if text in seen:
            continue
        seen.add(text)
        out.append({"prompt": text, "route": route, "reason": reason, "kind": kind})
    return out


def generate(seed: int, n_self: int, n_fin: int, seen: set[str]) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = _pairs(SELF_TEMPLATES, "self", n_self, rng, seen) + _pairs(FIN_TEMPLATES, "npc_fin", n_fin, rng, seen)
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    seen: set[str] = set()
    write(HERE / "train.jsonl", generate(seed=1, n_self=300, n_fin=200, seen=seen))
    # Same generator, another seed, no prompt shared with training: in-distribution only.
    write(HERE / "eval_in_distribution.jsonl", generate(seed=2, n_self=60, n_fin=40, seen=seen))


if __name__ == "__main__":
    main()
