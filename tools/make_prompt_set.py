"""Generate ``examples/data/prompts_en.jsonl``: short English prompts with reference answers.

The embedded prompt set of the out-of-the-box distillation (issue 8): general-knowledge and
instruction prompts a 135M-parameter instruct model (SmolLM2-135M-Instruct) can answer, each with a
short correct reference (1-2 sentences). Records are ``{"prompt": str, "reference": str}``; the
teacher's responses are added later by ``tools/generate_responses.py``.

Every prompt and reference comes from the tables and templates below, written for this project (no
external dataset, model or web text). Phrasings rotate per family so the model sees varied
instructions. The generator is seeded; the output is byte-identical from run to run.

Families: capitals, science facts, one-sentence explanations, definitions of everyday words,
synonyms, antonyms, short lists, formal rewriting, plurals and past tenses, and tiny reasoning
(arithmetic word problems, comparisons, calendar steps, counting legs, odd one out, even or odd).

Usage::

    python tools/make_prompt_set.py --output examples/data/prompts_en.jsonl   # --seed 2024 default
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

# --------------------------------------------------------------------------------------------------
# fact tables (written for this project)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Switzerland", "Bern"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
]  # fmt: skip

CAPITAL_TEMPLATES = [
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
]

SCIENCE = [
    ("At what temperature does water boil at sea level, in degrees Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze, in degrees Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What gas do plants take in from the air to make food?", "Plants take in carbon dioxide."),
    ("What gas do humans need to breathe to stay alive?", "Humans need oxygen."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O."),
    ("What star is at the center of our solar system?", "The Sun is the star at the center of our solar system."),
    ("What force pulls objects toward the ground?", "Gravity pulls objects toward the ground."),
    ("What organ pumps blood through the human body?", "The heart pumps blood through the body."),
    ("Which organ do humans use to breathe?", "Humans breathe with their lungs."),
    ("How many bones does an adult human have?", "An adult human has 206 bones."),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance."),
    ("What do bees make from the nectar of flowers?", "Bees make honey from nectar."),
    ("What is the name of the Earth's natural satellite?", "The Earth's natural satellite is the Moon."),
    ("How long does it take the Earth to orbit the Sun?", "It takes the Earth about 365 days, or one year, to orbit the Sun."),
    ("How long does it take the Earth to spin once on its axis?", "The Earth spins once on its axis in about 24 hours."),
    ("What are the three common states of matter?", "The three common states of matter are solid, liquid and gas."),
    ("What is the main gas in the air we breathe?", "Nitrogen is the main gas in the air, about 78 percent."),
    ("What color do you get when you mix blue and yellow paint?", "Mixing blue and yellow paint gives green."),
    ("What color do you get when you mix red and white paint?", "Mixing red and white paint gives pink."),
    ("What kind of animal is a whale?", "A whale is a mammal."),
    ("What kind of animal is a frog?", "A frog is an amphibian."),
    ("Is a spider an insect?", "No, a spider is an arachnid; it has eight legs, while insects have six."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What is the boiling point of water in degrees Fahrenheit?", "Water boils at 212 degrees Fahrenheit at sea level."),
    ("What part of a plant absorbs water from the soil?", "The roots absorb water from the soil."),
    ("Which vitamin does the skin make when exposed to sunlight?", "The skin makes vitamin D in sunlight."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the tallest mountain on Earth above sea level?", "Mount Everest is the tallest mountain above sea level."),
    ("What metal is liquid at room temperature?", "Mercury is a metal that is liquid at room temperature."),
    ("Does sound travel faster in air or in water?", "Sound travels faster in water than in air."),
    ("Which travels faster, light or sound?", "Light travels much faster than sound."),
    ("What do we call animals that eat only plants?", "Animals that eat only plants are called herbivores."),
    ("What do we call animals that eat only meat?", "Animals that eat only meat are called carnivores."),
    ("What is the center of an atom called?", "The center of an atom is called the nucleus."),
    ("What is the largest organ of the human body?", "The skin is the largest organ of the human body."),
    ("Why do we see lightning before we hear thunder?", "Light travels faster than sound, so the flash reaches us before the thunder."),
]  # fmt: skip

CONCEPTS = [
    ("photosynthesis", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make their own food and release oxygen."),
    ("gravity", "Gravity is the force that pulls objects toward each other, such as things falling toward the Earth."),
    ("evaporation", "Evaporation is when a liquid, such as water, turns into a gas, usually because it is heated."),
    ("a volcano", "A volcano is an opening in the Earth's surface through which hot melted rock, ash and gas escape."),
    ("an earthquake", "An earthquake is a sudden shaking of the ground caused by movements of rock deep inside the Earth."),
    ("the water cycle", "The water cycle is the continuous movement of water from the ground to the sky as vapor and back again as rain or snow."),
    ("a habitat", "A habitat is the natural home where an animal or plant lives."),
    ("a fossil", "A fossil is the preserved remains or trace of a plant or animal that lived long ago."),
    ("electricity", "Electricity is a form of energy carried by moving electric charges, used to power lights and machines."),
    ("a magnet", "A magnet is an object that attracts iron and some other metals."),
    ("friction", "Friction is the force that resists motion when two surfaces rub against each other."),
    ("a rainbow", "A rainbow is an arc of colors in the sky made when sunlight is bent and split by raindrops."),
    ("an eclipse", "An eclipse happens when one object in space, such as the Moon, blocks the light of another, such as the Sun."),
    ("a democracy", "A democracy is a system of government in which citizens choose their leaders by voting."),
    ("inflation", "Inflation is the general rise in prices over time, which means money buys less."),
    ("a budget", "A budget is a plan for how to spend and save money over a period of time."),
    ("recycling", "Recycling is turning used materials such as paper, glass and plastic into new products."),
    ("a vaccine", "A vaccine is a medicine that trains the body's immune system to fight a specific disease."),
    ("a computer program", "A computer program is a set of instructions that tells a computer what to do."),
    ("the internet", "The internet is a worldwide network that connects computers so they can share information."),
    ("a password", "A password is a secret word or phrase used to prove who you are before accessing an account."),
    ("a verb", "A verb is a word that describes an action or a state, such as run or be."),
    ("a noun", "A noun is a word that names a person, place, thing or idea."),
    ("an adjective", "An adjective is a word that describes a noun, such as big or red."),
    ("a metaphor", "A metaphor is a figure of speech that describes something by saying it is something else."),
    ("a map", "A map is a drawing that shows where places are and how they relate to each other."),
    ("a calendar", "A calendar is a chart that shows the days, weeks and months of a year."),
    ("a thermometer", "A thermometer is a tool that measures temperature."),
    ("a telescope", "A telescope is an instrument that makes distant objects, such as stars, look closer."),
    ("a microscope", "A microscope is an instrument that makes very small things look larger so we can see them."),
    ("climate", "Climate is the usual weather of a place over many years."),
    ("a desert", "A desert is a very dry area that gets little rain."),
    ("an island", "An island is a piece of land completely surrounded by water."),
    ("a continent", "A continent is one of the Earth's very large land masses, such as Africa or Asia."),
    ("digestion", "Digestion is the process by which the body breaks food down into substances it can use."),
    ("a cell", "A cell is the smallest living unit that makes up all plants and animals."),
    ("energy", "Energy is the ability to do work or cause change, such as moving or heating something."),
    ("a shadow", "A shadow is a dark area formed when an object blocks light."),
    ("a season", "A season is one of the four parts of the year, spring, summer, autumn and winter, each with its own weather."),
    ("a tide", "A tide is the regular rise and fall of the sea level, caused mainly by the pull of the Moon."),
]  # fmt: skip

CONCEPT_TEMPLATES = [
    "Explain in one sentence what {thing} is.",
    "In one sentence, what is {thing}?",
    "Briefly explain what {thing} is.",
    "What is {thing}? Answer in one sentence.",
]

WORDS = [
    ("umbrella", "An umbrella is a folding cover on a stick that keeps you dry in the rain."),
    ("kettle", "A kettle is a container used to boil water."),
    ("pillow", "A pillow is a soft cushion that supports your head while you sleep."),
    ("ladder", "A ladder is a set of steps between two long sides, used for climbing up and down."),
    ("wallet", "A wallet is a small flat case for carrying money and cards."),
    ("library", "A library is a place where books are kept for people to read or borrow."),
    ("bakery", "A bakery is a shop where bread and cakes are made and sold."),
    ("neighbor", "A neighbor is a person who lives next to or near you."),
    ("breakfast", "Breakfast is the first meal of the day, eaten in the morning."),
    ("recipe", "A recipe is a set of instructions for cooking a dish."),
    ("invitation", "An invitation is a request for someone to come to an event."),
    ("journey", "A journey is a trip from one place to another."),
    ("hobby", "A hobby is an activity you do for fun in your free time."),
    ("promise", "A promise is a statement that you will certainly do something."),
    ("apology", "An apology is saying that you are sorry for something you did."),
    ("schedule", "A schedule is a plan that lists times when things will happen."),
    ("receipt", "A receipt is a piece of paper showing that you paid for something."),
    ("passport", "A passport is an official document that proves who you are when you travel abroad."),
    ("helmet", "A helmet is a hard hat that protects your head."),
    ("blanket", "A blanket is a large piece of warm cloth used to cover you in bed."),
    ("mirror", "A mirror is a piece of glass that reflects your image."),
    ("candle", "A candle is a stick of wax with a wick that you burn to give light."),
    ("harvest", "A harvest is the gathering of ripe crops from the fields."),
    ("festival", "A festival is a special time of celebration, often with music, food and events."),
    ("volunteer", "A volunteer is a person who offers to do work without being paid."),
    ("deadline", "A deadline is the latest time by which something must be done."),
    ("souvenir", "A souvenir is an object you keep to remember a place or event."),
    ("habit", "A habit is something you do regularly, often without thinking about it."),
    ("curious", "Curious means eager to learn or know about something."),
    ("generous", "Generous means happy to give money, time or help to others."),
    ("polite", "Polite means behaving with good manners and respect toward others."),
    ("brave", "Brave means ready to face danger or difficulty without fear."),
    ("ancient", "Ancient means very old, from a time long ago."),
    ("fragile", "Fragile means easily broken or damaged."),
    ("patient", "Patient means able to wait calmly without getting annoyed."),
]  # fmt: skip

WORD_TEMPLATES = [
    "What does the word '{word}' mean?",
    "Define the word '{word}'.",
    "Give a short definition of '{word}'.",
    "What is the meaning of '{word}'?",
    "Explain the word '{word}' in one sentence.",
]

SYNONYMS = [
    ("happy", "glad"), ("big", "large"), ("small", "tiny"), ("fast", "quick"), ("begin", "start"),
    ("end", "finish"), ("smart", "clever"), ("angry", "furious"), ("easy", "simple"), ("buy", "purchase"),
    ("help", "assist"), ("shout", "yell"), ("rich", "wealthy"), ("shut", "close"), ("sad", "unhappy"),
    ("pretty", "beautiful"), ("cold", "chilly"), ("talk", "speak"), ("choose", "pick"), ("gift", "present"),
    ("jump", "leap"), ("quiet", "silent"), ("tired", "sleepy"), ("correct", "right"), ("scared", "afraid"),
]  # fmt: skip

SYNONYM_TEMPLATES = [
    "Give a synonym for '{word}'.",
    "What is another word for '{word}'?",
    "Name a word that means the same as '{word}'.",
    "Suggest one synonym of '{word}'.",
]

ANTONYMS = [
    ("hot", "cold"), ("up", "down"), ("open", "closed"), ("early", "late"), ("heavy", "light"),
    ("full", "empty"), ("strong", "weak"), ("young", "old"), ("day", "night"), ("win", "lose"),
    ("push", "pull"), ("inside", "outside"), ("wet", "dry"), ("loud", "quiet"), ("high", "low"),
    ("thick", "thin"), ("ask", "answer"), ("buy", "sell"), ("arrive", "leave"), ("remember", "forget"),
]  # fmt: skip

ANTONYM_TEMPLATES = [
    "What is the opposite of '{word}'?",
    "Give an antonym of '{word}'.",
    "Name a word that means the opposite of '{word}'.",
    "Which word is the opposite of '{word}'?",
]

LISTS = [
    ("fruits", ["apple", "banana", "orange"]), ("vegetables", ["carrot", "potato", "spinach"]),
    ("colors", ["red", "blue", "green"]), ("animals that live in the ocean", ["dolphin", "shark", "octopus"]),
    ("farm animals", ["cow", "sheep", "pig"]), ("musical instruments", ["piano", "guitar", "violin"]),
    ("sports", ["football", "tennis", "swimming"]), ("kitchen tools", ["knife", "spoon", "pan"]),
    ("things you can find in a classroom", ["desk", "chalkboard", "pencil"]),
    ("planets", ["Mercury", "Venus", "Earth"]), ("birds", ["eagle", "sparrow", "penguin"]),
    ("kinds of weather", ["rain", "snow", "wind"]), ("body parts", ["hand", "knee", "nose"]),
    ("pieces of clothing", ["shirt", "jacket", "sock"]), ("shapes", ["circle", "square", "triangle"]),
    ("means of transport", ["car", "train", "bicycle"]), ("drinks", ["water", "tea", "milk"]),
    ("insects", ["ant", "bee", "butterfly"]), ("jobs", ["teacher", "doctor", "farmer"]),
    ("countries in Europe", ["France", "Spain", "Poland"]), ("wild animals", ["lion", "elephant", "giraffe"]),
    ("days of the week", ["Monday", "Tuesday", "Wednesday"]), ("flowers", ["rose", "tulip", "daisy"]),
    ("metals", ["iron", "copper", "gold"]), ("things that are cold", ["ice", "snow", "a freezer"]),
]  # fmt: skip

LIST_TEMPLATES = [
    "List three {what}.",
    "Name three {what}.",
    "Give me three examples of {what}.",
    "Can you list three {what}?",
    "Write down three {what}.",
]

FORMAL = [
    ("Hey, what's up?", "Hello, how are you?"),
    ("Gimme a sec.", "Please give me a moment."),
    ("I wanna go home.", "I would like to go home."),
    ("Thanks a lot, buddy!", "Thank you very much."),
    ("Can't make it today, sorry.", "I apologize, but I am unable to attend today."),
    ("That movie was super cool.", "That film was excellent."),
    ("Send me the stuff ASAP.", "Please send me the materials as soon as possible."),
    ("I dunno the answer.", "I do not know the answer."),
    ("We gotta finish this now.", "We must finish this now."),
    ("The food was kinda bad.", "The food was rather poor."),
    ("See ya tomorrow!", "I will see you tomorrow."),
    ("Yeah, sounds good to me.", "Yes, that sounds acceptable to me."),
    ("My boss is gonna be mad.", "My manager will be displeased."),
    ("Lemme know if you need help.", "Please let me know if you need any assistance."),
    ("The meeting got pushed back.", "The meeting has been postponed."),
    ("I'm totally beat.", "I am very tired."),
    ("Can you fix this real quick?", "Could you please correct this promptly?"),
    ("Nope, not interested.", "No, thank you; I am not interested."),
    ("Check out the new report.", "Please review the new report."),
    ("Sorry I'm late, traffic was crazy.", "I apologize for my late arrival; the traffic was very heavy."),
]  # fmt: skip

FORMAL_TEMPLATES = [
    'Make this sentence formal: "{text}"',
    'Rewrite the following sentence in a formal tone: "{text}"',
    'Rewrite this more politely and formally: "{text}"',
    'Turn this casual sentence into formal English: "{text}"',
]

PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("box", "boxes"),
    ("city", "cities"), ("knife", "knives"), ("sheep", "sheep"), ("woman", "women"), ("leaf", "leaves"),
]  # fmt: skip

PAST_TENSES = [
    ("go", "went"), ("eat", "ate"), ("write", "wrote"), ("see", "saw"), ("run", "ran"),
    ("buy", "bought"), ("think", "thought"), ("swim", "swam"), ("bring", "brought"), ("teach", "taught"),
]  # fmt: skip

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Omar", "Mia", "Ravi", "Sara", "Leo", "Nina", "Kai", "Eva"]
ITEMS = ["apples", "books", "pencils", "stickers", "cookies", "marbles", "stamps", "shells"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LEGS = [("cat", 4), ("dog", 4), ("chicken", 2), ("spider", 8), ("duck", 2), ("horse", 4), ("ant", 6)]
ODD_ONE_OUT = [
    (["apple", "banana", "carrot", "pear"], "carrot", "it is a vegetable and the others are fruits"),
    (["dog", "cat", "rose", "horse"], "rose", "it is a flower and the others are animals"),
    (["red", "blue", "table", "green"], "table", "it is a piece of furniture and the others are colors"),
    (["Monday", "June", "Friday", "Sunday"], "June", "it is a month and the others are days of the week"),
    (["car", "bus", "train", "chair"], "chair", "it is furniture and the others are vehicles"),
    (["piano", "violin", "spoon", "drum"], "spoon", "it is a kitchen tool and the others are instruments"),
    (["eagle", "sparrow", "salmon", "owl"], "salmon", "it is a fish and the others are birds"),
    (["circle", "square", "triangle", "seven"], "seven", "it is a number and the others are shapes"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# families: each returns (prompt, reference) pairs


def _sentence(text: str) -> str:
    """``text`` ending in exactly one full stop (``Washington, D.C.`` keeps its own)."""
    return text if text.endswith(".") else text + "."


def _rotate(templates: list[str], i: int, **fields: str) -> str:
    return templates[i % len(templates)].format(**fields)


def capitals() -> list[tuple[str, str]]:
    out = []
    for i, (country, city) in enumerate(CAPITALS):
        if i % 5 == 4:  # the reverse question, for variety
            out.append(
                (f"{city} is the capital of which country?", _sentence(f"{city} is the capital of {country}"))
            )
        else:
            out.append(
                (
                    _rotate(CAPITAL_TEMPLATES, i, country=country),
                    _sentence(f"The capital of {country} is {city}"),
                )
            )
    return out


def explanations() -> list[tuple[str, str]]:
    return [(_rotate(CONCEPT_TEMPLATES, i, thing=thing), ref) for i, (thing, ref) in enumerate(CONCEPTS)]


def definitions() -> list[tuple[str, str]]:
    return [(_rotate(WORD_TEMPLATES, i, word=word), ref) for i, (word, ref) in enumerate(WORDS)]


def synonyms() -> list[tuple[str, str]]:
    return [
        (_rotate(SYNONYM_TEMPLATES, i, word=a), f"A synonym for '{a}' is '{b}'.")
        for i, (a, b) in enumerate(SYNONYMS)
    ]


def antonyms() -> list[tuple[str, str]]:
    return [
        (_rotate(ANTONYM_TEMPLATES, i, word=a), f"The opposite of '{a}' is '{b}'.")
        for i, (a, b) in enumerate(ANTONYMS)
    ]


def lists() -> list[tuple[str, str]]:
    out = []
    for i, (what, examples) in enumerate(LISTS):
        first = examples[0][0].upper() + examples[0][1:]
        out.append((_rotate(LIST_TEMPLATES, i, what=what), f"{first}, {examples[1]} and {examples[2]}."))
    return out


def formal() -> list[tuple[str, str]]:
    return [(_rotate(FORMAL_TEMPLATES, i, text=a), b) for i, (a, b) in enumerate(FORMAL)]


def grammar() -> list[tuple[str, str]]:
    plural = ["What is the plural of '{w}'?", "Give the plural form of the word '{w}'."]
    past = ["What is the past tense of '{w}'?", "Write the past tense of the verb '{w}'."]
    out = [(plural[i % 2].format(w=a), f"The plural of '{a}' is '{b}'.") for i, (a, b) in enumerate(PLURALS)]
    out += [
        (past[i % 2].format(w=a), f"The past tense of '{a}' is '{b}'.")
        for i, (a, b) in enumerate(PAST_TENSES)
    ]
    return out


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return q, f"{name} has {a + b} {item} now, because {a} + {b} = {a + b}."
    b = min(b, a - 1)
    q = f"{name} had {a} {item} and gave {b} to a friend. How many {item} are left?"
    return q, f"{name} has {a - b} {item} left, because {a} - {b} = {a - b}."


def _boxes(rng: random.Random) -> tuple[str, str]:
    n, k, item = rng.randint(2, 6), rng.randint(2, 9), rng.choice(ITEMS)
    q = f"There are {n} boxes with {k} {item} in each box. How many {item} are there in total?"
    return q, f"There are {n * k} {item} in total, because {n} x {k} = {n * k}."


def _comparison(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(NAMES, 3)
    adjective, superlative = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest")])
    q = f"{a} is {adjective} than {b}, and {b} is {adjective} than {c}. Who is the {superlative}?"
    return q, f"{a} is the {superlative}."


def _calendar(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randrange(7), rng.randint(1, 5)
    q = f"If today is {DAYS[start]}, what day will it be in {step} {'day' if step == 1 else 'days'}?"
    return q, f"It will be {DAYS[(start + step) % 7]}."


def _legs(rng: random.Random) -> tuple[str, str]:
    (animal, legs), count = rng.choice(LEGS), rng.randint(2, 5)
    q = f"How many legs do {count} {animal}s have in total?"
    return q, f"{count} {animal}s have {count * legs} legs, since each has {legs}."


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(11, 99)
    return f"Is {n} an even or an odd number?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


REASONING_DRAWS = [
    (_word_problem, 12), (_boxes, 6), (_comparison, 6), (_calendar, 6), (_legs, 5), (_parity, 4), (_larger, 4),
]  # fmt: skip


def reasoning(rng: random.Random) -> list[tuple[str, str]]:
    """Tiny reasoning: every answer is computed from the drawn numbers and names (no repeats)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for draw, count in REASONING_DRAWS:
        made = 0
        while made < count:
            prompt, reference = draw(rng)
            if prompt not in seen:
                seen.add(prompt)
                out.append((prompt, reference))
                made += 1
    for words, odd, why in ODD_ONE_OUT:
        shuffled = words[:]
        rng.shuffle(shuffled)
        out.append(
            (
                f"Which word does not belong: {', '.join(shuffled)}?",
                f"'{odd}' does not belong, because {why}.",
            )
        )
    return out


def make_records(seed: int = 2024) -> list[dict[str, str]]:
    """All records, shuffled with ``seed``; raises if any prompt repeats or a field is empty."""
    rng = random.Random(seed)
    pairs = (
        capitals() + list(SCIENCE) + explanations() + definitions() + synonyms() + antonyms()
        + lists() + formal() + grammar() + reasoning(rng)
    )  # fmt: skip
    repeated = [p for p, n in Counter(p for p, _ in pairs).items() if n > 1]
    if repeated:
        raise ValueError(f"repeated prompts: {repeated[:5]}")
    if any(not p.strip() or not r.strip() for p, r in pairs):
        raise ValueError("empty prompt or reference")
    rng.shuffle(pairs)
    return [{"prompt": p, "reference": r} for p, r in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", required=True, help="path of the JSONL file to write (replaced atomically)"
    )
    parser.add_argument(
        "--seed", type=int, default=2024, help="seed of the draws and the shuffle (default 2024)"
    )
    args = parser.parse_args(argv)
    records = make_records(args.seed)
    tmp = f"{args.output}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(records)} records to {args.output} ({os.path.getsize(args.output)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
