"""The text pools of `ragjax.data.synthetic_docs`: roles, relatives, distractor and filler
sentences, news leads and section headings (changing any of them changes every corpus)."""
from __future__ import annotations

ROLES = ("engineer", "researcher", "analyst", "consultant", "designer", "manager", "scientist",
         "executive")
RELATIVES = ("mother", "father", "sister", "brother", "cousin", "aunt", "uncle", "grandmother",
             "grandfather", "neighbour", "best friend", "mentor")
# Distractors by kind: someone else's (or an event's) value of one attribute kind. {rel}: a
# relative; {city} {year} {date} {univ} {major} {employer}: values that are never the person's own.
DISTRACTORS = {
    "birth": (
        "{Poss} {rel} was born in {city}.",
        "{Poss} {rel} was born in {year}.",
        "{Poss} {rel} is a native of {city}.",
        "{Poss} {rel} was born on {bdate}.",
    ),
    "school": (
        "{Poss} {rel} studied {major} at {univ}.",
        "{Poss} {rel} graduated from {univ}.",
        "{S} once gave a guest lecture at {univ}.",
        "{Poss} {rel} majored in {major}.",
    ),
    "work": (
        "{Poss} {rel} works for {employer}.",
        "{Poss} {rel} spent thirty years at {employer}.",
        "{S} turned down an offer from {employer}.",
        "{Poss} {rel} is employed by {employer}.",
    ),
    "place": (
        "{S} moved to {city} in {year}.",
        "{S} now lives in {city}.",
        "{S} spent a sabbatical year in {city}.",
    ),
}
# The early-life passage states the birth city and is where a namesake's city is looked up, so
# its distractors name no other city.
KINDS = {"early": ("school", "work"), "education": ("birth", "work", "place"),
          "career": ("birth", "school", "place"), "personal": ("birth", "school", "work", "place")}
ATTR_KIND = {"university": "school", "major": "school", "employer": "work"}
FILLERS = {
    "early": (
        "{S} grew up in a house full of books.",
        "{S} was the youngest of four children.",
        "As a child, {s} spent summers on {poss} grandparents' farm.",
        "{Poss} parents ran a small bakery.",
        "{S} learned to play the piano at an early age.",
    ),
    "education": (
        "{S} was remembered as a diligent student.",
        "{S} wrote {poss} thesis in two years.",
        "{S} won a prize for the best final project.",
    ),
    "career": (
        "{S} leads a team of twelve people.",
        "Colleagues describe {o} as patient and precise.",
        "{S} was promoted twice in five years.",
        "{S} mentors junior staff.",
    ),
    "personal": (
        "{S} is married and has two children.",
        "{S} volunteers at a local library.",
        "{S} collects old maps.",
    ),
    "news": (
        "{S} told reporters that the work had taken years.",
        "The audience gave {o} a standing ovation.",
        "{S} plans to write a book about the experience.",
        "Critics called the project ambitious.",
    ),
}
NEWS_LEADS = (
    "{S} spoke at a conference in {city} on {date}.",
    "On {date}, {s} received an award at a ceremony in {city}.",
    "{S} was interviewed in {city} on {date} about a new project.",
    "A project led by {o} was presented in {city} on {date}.",
)
HEADINGS = {"early": "Early life.", "education": "Education.", "career": "Career.",
            "personal": "Personal life."}
