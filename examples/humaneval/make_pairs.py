"""Write pairs.jsonl: blind-comparison pairs for the sales-companion demo, from templates (no model is called).

"base" answers the way a general-purpose model does: long, hedged, generic. "finetuned" answers in Acme's
voice: short, specific, one clear ask, signed "Talk soon". Two answers give their model away on purpose,
so `abproxy humaneval import` shows what it flags.

    python examples/humaneval/make_pairs.py   # rewrites examples/humaneval/pairs.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

ACCOUNTS = [
    ("Dana", "Northwind Logistics", "logistics"),
    ("Priya", "Helios Energy", "energy"),
    ("Marco", "Bluefin Retail", "retail"),
    ("Keiko", "Vantage Health", "healthcare"),
    ("Sam", "Orbit Fintech", "financial services"),
    ("Lena", "Cobalt Manufacturing", "manufacturing"),
    ("Omar", "Tidewater Foods", "food distribution"),
    ("Grace", "Summit Insurance", "insurance"),
    ("Jonas", "Redwood Media", "media"),
    ("Ava", "Pioneer Telecom", "telecom"),
]
OBJECTIONS = [
    ("It's too expensive.", "price"),
    ("We already use a competitor.", "incumbent"),
    ("Now isn't a good time.", "timing"),
    ("I need to check with my boss.", "authority"),
    ("Your product seems complicated.", "complexity"),
    ("We built something in-house.", "build vs buy"),
]


def follow_up(name: str, company: str, industry: str) -> tuple[str, str, str]:
    prompt = f"Write a short follow-up email to {name} at {company} after yesterday's Acme Insights demo."
    base = (
        f"Subject: Following Up on Our Recent Meeting\n\nDear {name},\n\nI hope this email finds you well. I wanted "
        f"to take a moment to thank you for taking the time to meet with us yesterday. It was a pleasure to learn "
        f"more about {company} and the challenges you are facing. Our solution offers a wide range of features "
        f"that could potentially be beneficial for companies in the {industry} industry. Please do not hesitate "
        f"to reach out if you have any questions or if there is anything else I can help you with.\n\nBest regards"
    )
    finetuned = (
        f"Subject: Your {industry} dashboard, next step\n\nHi {name},\n\nThanks for the time yesterday. You said "
        f"your team loses hours each week stitching reports together; Acme Insights puts that on one live "
        f"dashboard. Could we book 30 minutes on Thursday to load a week of {company}'s data and show you the "
        f"real numbers?\n\nTalk soon,\nAlex, Acme"
    )
    return prompt, base, finetuned


def objection(text: str, kind: str, company: str) -> tuple[str, str, str]:
    prompt = f"{company}'s buyer just told me: \"{text}\" How do I respond on the call?"
    base = (
        f"Handling objections is an important part of the sales process. When a prospect raises a concern about "
        f"{kind}, it is essential to listen carefully, acknowledge their concern, and ask clarifying questions. "
        f"You might consider emphasizing the value of your product, sharing relevant case studies, and offering "
        f"to follow up with additional information. Remember to remain professional and empathetic at all times."
    )
    finetuned = (
        f"Acknowledge, then ask. Try: \"That's fair. When you say '{text.rstrip('.')}', what are you comparing "
        f"us against?\" Then tie the answer to one number from their world: Acme customers cut reporting time by "
        f"a third in the first quarter. Close with a single ask: a 20-minute pilot review with {company}'s team."
    )
    return prompt, base, finetuned


def discovery(name: str, company: str, industry: str) -> tuple[str, str, str]:
    prompt = f"Give me three discovery questions for my first call with {name} ({company}, {industry})."
    base = (
        "Here are some questions you could ask:\n1. Can you tell me about your company?\n2. What are your "
        "current challenges?\n3. What are your goals for the next year?\nThese open-ended questions can help "
        "you better understand the prospect's needs and build rapport."
    )
    finetuned = (
        f"1. Which report does {company} rebuild by hand every week, and who waits for it?\n2. When a {industry} "
        f"number looks wrong, how long until someone finds out?\n3. If that fixed itself next quarter, what "
        f"would your team do with the time?\nKeep it to these three; let {name} talk."
    )
    return prompt, base, finetuned


def renewal(name: str, company: str, industry: str) -> tuple[str, str, str]:
    prompt = f"What should I cover in next week's renewal call with {company}?"
    base = (
        "For a renewal call, it is generally a good idea to review the customer's experience with the product, "
        "discuss any issues they may have encountered, highlight new features, and explore opportunities for "
        "expansion. You may also want to prepare pricing information and be ready to negotiate terms."
    )
    finetuned = (
        f"Three things, in this order: the win (what Acme Insights saved {company} this year, in hours), the "
        f"gap (the one open ticket {name} still cares about, with a fix date), and the ask (renew for two years "
        f"with the {industry} pack included). Send the agenda a day ahead."
    )
    return prompt, base, finetuned


def linkedin(name: str, company: str, industry: str) -> tuple[str, str, str]:
    prompt = f"Draft a LinkedIn connection note to {name}, a new ops lead at {company}."
    base = (
        f"Hi {name}, I came across your profile and was impressed by your experience. I work with companies "
        f"in the {industry} space and would love to connect and explore potential synergies. Looking forward "
        f"to connecting!"
    )
    finetuned = (
        f"Hi {name}, congrats on the new role at {company}. I help {industry} ops teams get their weekly "
        f"numbers without the spreadsheet marathon. Happy to share what peers are doing, no pitch. Talk soon, Alex"
    )
    return prompt, base, finetuned


def pairs() -> list[dict[str, object]]:
    triples: list[tuple[str | list[dict[str, str]], str, str]] = []
    for i, (name, company, industry) in enumerate(ACCOUNTS):
        for make in (follow_up, discovery, renewal, linkedin):
            triples.append(make(name, company, industry))
        triples.append(objection(*OBJECTIONS[i % len(OBJECTIONS)], company))
        # A chat-shaped prompt too: the import takes a messages list as well as a string.
        prompt, base, finetuned = objection(*OBJECTIONS[(i + 3) % len(OBJECTIONS)], company)
        system = {"role": "system", "content": "You are Acme's sales companion."}
        triples.append(([system, {"role": "user", "content": prompt}], base, finetuned))
    # Two answers that give their model away: the import flags them and studies leave them out.
    triples[7] = (*triples[7][:2], "As Acme's fine-tuned sales assistant, I'd keep it to three lines and one ask.")
    revealing = "As a general-purpose base model I don't know Acme's pricing, but you could ask for a discount."
    triples[22] = (triples[22][0], revealing, triples[22][2])
    return [
        {"id": f"sales-{n:03d}", "prompt": prompt, "responses": {"base": base, "finetuned": finetuned}}
        for n, (prompt, base, finetuned) in enumerate(triples, start=1)
    ]


if __name__ == "__main__":
    out = Path(__file__).with_name("pairs.jsonl")
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs()), encoding="utf-8")
    print(f"wrote {out}")
