"""The prompts that `mlc_spec train-draft` asks the target to answer: topics x task templates, plus a
few standalone requests of other shapes. Held-out prompts use topics never seen in training, so
held-out acceptance measures generalisation, not memorised topics."""

from __future__ import annotations

import random

TOPICS = """photosynthesis|black holes|the French Revolution|machine learning|climate change|volcanoes|
the human heart|the Roman Empire|quantum computing|honey bees|the water cycle|blockchain|
the printing press|jazz music|coral reefs|the immune system|electric cars|ancient Egypt|
the stock market|sleep|coffee|the moon landing|plate tectonics|vaccines|the internet|
Shakespeare|chess|the Great Wall of China|renewable energy|DNA|inflation|the Olympic Games|
rainforests|Python programming|the periodic table|gravity|the Renaissance|social media|
meditation|dinosaurs|the solar system|democracy|recycling|earthquakes|the brain|bread baking|
gardening|the ocean tides|World War II|artificial intelligence|time management|public speaking|
friendship|the Industrial Revolution|electricity|rainbows|the Amazon river|penguins|
the history of writing|video games|nutrition|exercise|budgeting|job interviews|learning a language|
the speed of light|magnets|clouds|hurricanes|the pyramids|Mars|telescopes|bicycles|airplanes|
trains|the theory of evolution|antibiotics|the human skeleton|music theory|painting|photography|
poetry|the Cold War|the Silk Road|origami|tea|cheese making|wolves|elephants|octopuses|
sharks|butterflies|mushrooms|deserts|glaciers|the Arctic|cities|architecture|bridges|
robots|smartphones|the GPS system|3D printing|nuclear energy|solar panels|wind turbines|
batteries|the economy|taxes|credit cards|saving money|writing an essay|reading habits|
libraries|museums|the Moon|stars|comets|the Big Bang|the atom|chemical reactions|
fractions|prime numbers|probability|geometry|algebra|statistics|sorting algorithms|databases|
cybersecurity|passwords|email etiquette|teamwork|leadership|stress|happiness|kindness|
volunteering|pets|dogs|cats|horses|birds|the Vikings|the Aztecs|ancient Greece|mythology|
fairy tales|the Olympics of ancient Greece|football|basketball|tennis|marathon running|yoga|
cooking pasta|making pizza|chocolate|vegetables|fruit|the kitchen|camping|hiking|maps|
the compass|weather forecasting|lightning|snow|the seasons|farming|bees and pollination|
soil|trees|forests|rivers|lakes|islands|mountains|caves|the human eye|hearing|the skin|
muscles|the lungs|digestion|blood|the heart rate|first aid|hand washing|germs|viruses|
bacteria|the microscope|Isaac Newton|Albert Einstein|Marie Curie|Leonardo da Vinci|
Charles Darwin|Ada Lovelace|Nikola Tesla|Galileo|the telephone|television|radio|cinema|
the novel|comic books|board games|puzzles|magic tricks|dance|opera|the piano|the guitar|
drums|orchestras|folk music|rock music|hip hop|the blues|sculpture|pottery|knitting|sewing|
fashion|shoes|cars|traffic|public transport|city planning|parks|zoos|aquariums|space travel|
the International Space Station|satellites|rockets|asteroids|the Sun|eclipses|the Milky Way""".replace("\n", "").split("|")

TEMPLATES = """Explain {t} in simple terms.|Write a short poem about {t}.|Give me three fun facts about {t}.|
What is {t}?|Why is {t} important?|Write a short story involving {t}.|Summarize the history of {t}.|
How would you explain {t} to a five-year-old?|List the pros and cons of {t}.|Write a haiku about {t}.|
What are common misconceptions about {t}?|Give me a quiz question about {t} with the answer.|
Describe {t} in one paragraph.|What should a beginner know about {t}?|Write a tweet about {t}.|
Compare {t} with something from everyday life.|What are the main parts of {t}?|
How does {t} affect our daily lives?|Write a limerick about {t}.|Give me a step-by-step guide related to {t}.|
What questions do scientists still have about {t}?|Write a dialogue between two friends about {t}.|
Tell me a joke about {t}.|Write an opening sentence for an essay on {t}.|What is the future of {t}?|
Give me five keywords related to {t}.|Can you teach me something about {t}?|
Write a short advertisement for a book about {t}.|What is one surprising thing about {t}?|
Describe {t} using only simple words.|What are three questions a student might ask about {t}?|
Write a motivational message inspired by {t}.|How did people learn about {t}?|
Write a title and a one-sentence summary for an article on {t}.|Tell me about {t}.|
I am curious about {t}. Where should I start?|Give an example that shows how {t} works.|
In two sentences, what is {t}?|Write a recipe-style list of steps to understand {t}.|
What would happen if {t} did not exist?""".replace("\n", "").split("|")

# A few standalone prompts of other shapes (arithmetic, rewriting, code, chit-chat).
EXTRA = """Hi! How are you today?|What is 12 times 7?|Write a Python function that reverses a string.|
Translate 'good morning' into French and Spanish.|Give me a name for a pet goldfish.|
What is the capital of Japan?|Rewrite this sentence more politely: give me the report now.|
How many days are there in a leap year?|Write a thank-you note to a teacher.|Suggest a healthy breakfast.|
What is the difference between weather and climate?|Write a SQL query that counts rows in a table named users.|
Give me tips to fall asleep faster.|What is 15% of 80?|Write an email asking for a day off.|
Suggest three names for a bakery.|How do I make a cup of tea?|What rhymes with cat?|
Write a JavaScript function that adds two numbers.|Plan a one-day trip to a city of your choice.|
What are the primary colors?|Tell me a riddle.|Convert 5 kilometers to miles.|
Write a birthday message for my brother.|What is a noun? Give examples.|How do plants drink water?|
Give me a packing list for a beach holiday.|Explain what a variable is in programming.|
What is the square root of 144?|Write a short bedtime story about a dragon.""".replace("\n", "").split("|")



def build_prompts(seed: int, n_train: int, n_heldout: int, n_heldout_topics: int = 20) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts); held-out topics are disjoint from training ones."""
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS if t.strip()]
    templates = [t.strip() for t in TEMPLATES if t.strip()]
    rng.shuffle(topics)
    held_topics, train_topics = topics[:n_heldout_topics], topics[n_heldout_topics:]
    combos = [tpl.format(t=t) for t in train_topics for tpl in templates]
    rng.shuffle(combos)
    train = [e.strip() for e in EXTRA] + combos
    held = [tpl.format(t=t) for t in held_topics for tpl in templates]
    rng.shuffle(held)
    return train[:n_train], held[:n_heldout]
