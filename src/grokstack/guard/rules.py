"""Stage 2 of the guard: high-precision regex/lexicon rules, PII and secret detectors, and the benign allow-list.

The classifier does most harmful-intent detection; rules only catch phrasing that is unambiguous on its own:
- S4 sexual content involving minors (high: blocks in every profile),
- S9 requests to make or obtain mass-casualty weapons (high) and generic bomb-making requests (medium),
- S11 requests for self-harm instructions (high) and statements of intent (medium),
- S7 doxxing requests (high), S13 fake voting channels (high), a few medium S1/S2/S3/S8/S10/S12/S14 rules,
- detectors for the non-hazard signals `pii` (email, phone, card with Luhn, IBAN with mod-97, US SSN),
  `secret` (API-key shapes, private-key blocks) and `profanity` (severity only).

A `high` hit decides alone (see check.py). Non-high hazard hits are dropped when they overlap a benign
homonym ("kill a process", "shoot a photo", "execute a script") and scaled by CONTEXT_FACTOR in definition,
history, fiction, game, news or legal contexts. `neutralize` rewrites the same homonyms ("kill" -> "stop")
in the copy of the text the classifier sees, so figurative verbs do not pull its scores up either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

CODES = tuple(f"S{i}" for i in range(1, 15))
SIGNALS = ("pii", "secret", "profanity")  # detectors, not hazards
SEVERITY_SCORE = {"high": 1.0, "medium": 0.85, "low": 0.5}
CONTEXT_FACTOR = 0.4  # non-high hits in a discussion context: 0.85 -> 0.34, below the built-in thresholds


@dataclass(frozen=True)
class Hit:
    code: str  # S1..S14, "pii", "secret" or "profanity"
    score: float
    rule: str  # rule name, or "classifier" / "judge" (severity "model")
    severity: str  # high | medium | low | model
    span: tuple[int, int]  # character offsets in the inspected view
    view: int = 0  # 0: Normalized.text; i > 0: Normalized.decoded[i - 1]


@dataclass(frozen=True)
class Rule:
    name: str
    code: str
    severity: str
    pattern: re.Pattern
    score: float
    needs: tuple[str, ...]  # lower-case substrings, one of which must occur for the regex to be worth running
    valid: Callable[[str], bool] | None = None  # checksum or shape check of the matched text


def _any(words: str) -> str:
    """Non-capturing alternation of space-separated entries; '_' inside an entry means whitespace."""
    return "(?:" + "|".join(w.replace("_", r"\s+") for w in words.split()) + ")"


def _fill(n: int) -> str:
    """Up to n filler words (then whitespace), none of them a word that turns a request into a safety question."""
    word = r"\s+(?!(?:not|never|stop|avoid|prevent|survive|detect|treat|report|recogni[sz]e|identify)\b)[\w'-]+"
    return f"(?:{word}){{0,{n}}}?\\s+"


# ---- shared vocabulary ----------------------------------------------------------------------------------

REQ = r"\b" + _any(
    """how_to how_do_i how_do_you how_can_i how_could_i how_would_i how_should_i how_does_one how_can_one
    how_can_someone ways?_to way_of steps?_to steps?_for instructions?_for instructions?_to instructions?_on
    guide_to guide_for guide_on recipe_for tutorial_on tutorial_for procedure_for protocol_for teach_me_to
    teach_me_how_to show_me_how_to explain_how_to tell_me_how_to help_me i_want_to i_need_to i_plan_to
    i'm_going_to let's"""
)
MAKE = _any(
    """make making build building synthesi[sz]e synthesi[sz]ing produce producing manufacture manufacturing
    create creating cook cooking brew brewing weaponi[sz]e weaponi[sz]ing culture culturing grow growing enrich
    enriching assemble assembling aerosoli[sz]e extract extracting isolate isolating cultivate cultivating
    refine refining prepare preparing obtain obtaining acquire acquiring buy buying detonate detonating deploy
    deploying release releasing spread spreading disperse dispersing"""
)
CBRNE = _any(
    """sarin soman tabun cyclosarin vx_nerve_agent vx_gas vx novichok mustard_gas sulfur_mustard nitrogen_mustard
    nerve_agents? nerve_gas chemical_weapons? bio-?weapons? biological_weapons? anthrax_spores anthrax ricin
    abrin botulinum_toxin botulinum smallpox variola_virus bubonic_plague pneumonic_plague yersinia_pestis ebola
    marburg_virus dirty_bombs? nuclear_bombs? nuclear_weapons? nuclear_warheads? nuclear_device atomic_bombs?
    hydrogen_bombs? h-bombs? a-bombs? fission_bombs? radiological_weapons? radiological_bombs?
    radiological_dispersal_devices? weapons?-grade_uranium weapons?-grade_plutonium highly_enriched_uranium
    pipe_bombs? nail_bombs? pressure-cooker_bombs? pressure_cooker_bombs? car_bombs? suicide_vests? suicide_bombs?
    fertili[sz]er_bombs? ieds? improvised_explosive_devices? tatp acetone_peroxide hmtd petn rdx semtex"""
)
# Words after a weapon name that make it a defence, history or media topic.
NOT_WEAPON = (r"(?!\s*(?:vaccin\w*|antidotes?|treatments?|shelters?|detectors?|detection|sensors?|drills?|tests?|"
              r"testing|symptoms|survivors?|scares?|threats?|awareness|preparedness|doctor|masks?|suits?|museum|"
              r"documentar\w*|movies?|films?|games?|-?free|treat(?:y|ies)|proliferation|disarmament|polic\w*)\b)")
BOMB = (r"(?<!bath )(?<!seed )(?<!glitter )(?<!photo )(?<!stink )(?<!yarn )(?<!cherry )(?<!smoke )(?<!calorie )"
        r"(?<!flavor )(?<!flavour )(?<!truth )(?<!love )(?<!f-)" + _any(
            "bombs? explosives? explosive_devices? molotov_cocktails? napalm grenades? chlorine_gas phosgene "
            "poison_gas toxic_gas landmines?"))
PERSON = _any(
    """wife husband girlfriend boyfriend ex ex-wife ex-husband ex-girlfriend ex-boyfriend partner spouse boss
    coworker co-worker colleague neighbou?rs? teacher classmate roommate landlord father mother dad mom mum
    brother sister son daughter baby child kids? children family parents grandma grandmother grandpa grandfather
    uncle aunt cousin friends? bully stepdad stepmom someone somebody anyone people person man woman girl boy
    guy humans? cops? police_officer officer president senator politician judge journalist him her everyone
    dog cat puppy kitten horse pet"""
)
MINOR = (_any("""child children kids? minors? underage preteens? pre-teens? toddlers? infants? little_girls?
             little_boys? schoolchild schoolchildren""")
         + r"(?!'s)|\b(?:[1-9]|1[0-7])[-\s]?(?:years?[-\s]old|yo|y/o)")
SELF_HARM = _any(
    """kill(?:ing)?_myself commit(?:ting)?_suicide end(?:ing)?_my_(?:own_)?life end(?:ing)?_it_all
    tak(?:e|ing)_my_(?:own_)?life hang(?:ing)?_myself cut(?:ting)?_myself slit(?:ting)?_my_wrists?
    overdos(?:e|ing) od_on harm(?:ing)?_myself hurt(?:ing)?_myself starv(?:e|ing)_myself poison(?:ing)?_myself
    shoot(?:ing)?_myself drown(?:ing)?_myself burn(?:ing)?_myself"""
)
GROUP = _any(
    """jews muslims christians blacks black_people whites white_people gays gay_people lesbians trans_people
    transgender_people immigrants mexicans arabs asians hindus sikhs roma gypsies women refugees africans
    indians chinese latinos hispanics catholics atheists disabled_people"""
)


def _rules() -> list[Rule]:
    rules: list[Rule] = []

    def add(name: str, code: str, severity: str, needs: str, pattern: str, score: float | None = None,
            valid: Callable[[str], bool] | None = None, flags: int = re.I) -> None:
        """needs: trigger words ('~' is a space) or a key of _TRIGGERS; the regex runs only if one occurs."""
        score = SEVERITY_SCORE[severity] if score is None else score
        rules.append(Rule(name, code, severity, re.compile(pattern, flags), score, _needs(needs), valid))

    # S4: sexual content involving minors. High rules block in every profile.
    add("s4.csam_terms", "S4", "high", "porn p0rn nudes erotica sex",
        r"\b(?:child|kiddie|kiddy|pedo|paedo|preteen|pre-teen|underage|toddler)\s*-?\s*(?:porn\w*|p0rn|nudes|"
        r"erotica|sex\s+(?:videos?|tapes?|pics?|photos?))\b")
    add("s4.sexual_content_of_minor", "S4", "high", "porn erotic nude naked lewd nsfw hentai smut sex explicit",
        r"\b(?:porn\w*|erotic\w*|nudes|(?:nude|naked)\s+(?:photos?|pics?|pictures?|images?|videos?)|lewd|nsfw|"
        r"hentai|smut|(?:sex|sexual|explicit)\s+(?:story|stories|scenes?|roleplay|role-play|fantas(?:y|ies)|content|"
        r"images?|photos?|videos?))\s+(?:[\w'-]+\s+){0,2}?(?:of|with|involving|featuring|about|depicting|starring)"
        r"\s+(?:[\w'-]+\s+){0,3}?(?:" + MINOR + r")\b")
    add("s4.sexualize_minor", "S4", "high", "naked nude undress sex masturbat lingerie aroused orgasm",
        r"\b(?:write|describe|create|generate|draw|roleplay|role-play|imagine)\b"
        r"[^.!?\n]{0,60}?\b(?:" + MINOR + r")\b[^.!?\n]{0,40}?\b(?:naked|nude|undress\w*|having\s+sex|"
        r"sex\s+with|masturbat\w*|lingerie|aroused|orgasm\w*|sexual(?:ly)?(?!\s+(?:abuse|education|health|"
        r"safety|predators?|assault|development|orientation)))\b")
    add("s4.grooming", "S4", "high", "groom",
        REQ + _fill(1) + r"groom(?:ing)?\s+(?:(?:a|an|the|my|this|that|young)\s+)?(?:" + MINOR
        + r")(?!\s+(?:hair|nails|dog|pet))\b")
    add("s4.csam_acquire", "S4", "high", "csam sexual~abuse~material",
        r"\b(?:find|get|download|buy|trade|share|send|access)\s+(?:[\w'-]+\s+){0,2}?(?:csam|child\s+sexual\s+"
        r"abuse\s+material)\b")
    add("s4.sex_with_minor", "S4", "medium", "sex~with",
        r"\bsex\s+with\s+(?:(?:a|an|my|the|this)\s+)?(?:" + MINOR + r")\b", score=0.9)
    add("s4.loli", "S4", "medium", "lolicon shotacon", r"\b(?:lolicon|shotacon)\b", score=0.9)

    # S9: mass-casualty weapons.
    add("s9.make_request", "S9", "high", "CBRNE", REQ + _fill(3) + MAKE + _fill(2) + CBRNE + r"\b" + NOT_WEAPON)
    add("s9.make_instructions", "S9", "high", "CBRNE",
        r"\b(?:you|we|one)\s+(?:can|could|will|would|should|need\s+to|must|'ll|have\s+to)" + _fill(2) + MAKE
        + _fill(2) + CBRNE + r"\b" + NOT_WEAPON)
    add("s9.make_imperative", "S9", "high", "CBRNE",
        r"(?:^|[.!?:\n]\s*|\bplease\s+)(?:make|build|synthesi[sz]e|produce|create|cook|brew|weaponi[sz]e|culture|"
        r"grow|assemble)" + _fill(2) + CBRNE + r"\b" + NOT_WEAPON, flags=re.I | re.M)
    add("s9.synthesis_route", "S9", "high", "synthes",
        r"\bsynthes[ie]s\s+(?:route|procedure|steps|instructions|protocol|pathway|recipe)s?\s+(?:for|of|to)\s+"
        r"(?:[\w'-]+\s+){0,2}?" + CBRNE + r"\b")
    add("s9.production_of", "S9", "medium", "CBRNE",
        r"\b(?:synthesis|production|manufacture|manufacturing|weaponi[sz]ation)\s+(?:process\s+)?(?:of|for)\s+"
        + CBRNE + r"\b" + NOT_WEAPON)
    add("s9.bomb_request", "S9", "medium", "bomb explosive molotov napalm grenade chlorine phosgene gas landmine",
        REQ + _fill(3) + MAKE + _fill(2) + BOMB + r"\b" + NOT_WEAPON)

    # S11: suicide and self-harm.
    add("s11.method_request", "S11", "high", "myself suicide my~life my~own~life it~all wrist overdos od~on",
        r"\b(?:how\s+(?:do|can|should|would|could)\s+i|how\s+to|(?:best|easiest|quickest|fastest|painless|"
        r"least\s+painful|surest|most\s+effective|most\s+reliable)\s+(?:ways?|methods?)\s+(?:to|of|for|i\s+can)|"
        r"ways?\s+to|methods?\s+(?:to|of|for)|help\s+me|teach\s+me\s+(?:how\s+)?to|tell\s+me\s+how\s+to|"
        r"instructions?\s+(?:to|for|on))\s+(?:(?:painlessly|quickly|quietly|easily|successfully|finally|just|"
        r"best|safely|properly|actually)\s+)?" + SELF_HARM
        + r"\b(?!\s+(?:a|an|some|free|loose|off|out|short|laughing)\b)")  # "cut myself a slice", "... some slack"
    add("s11.method_list", "S11", "high", "suicide self-harm self~harm",
        r"\b(?:best|easiest|quickest|painless|least\s+painful|most\s+effective|surest|reliable)\s+"
        r"(?:suicide|self-harm|self\s+harm)\s+methods?\b")
    add("s11.dose_to_die", "S11", "high", "pill tablet capsule mg gram",
        r"\bhow\s+(?:many|much)\s+(?:[\w'-]+\s+){0,3}?(?:pills|tablets|capsules|mg|milligrams|grams)\s+"
        r"(?:[\w'-]+\s+){0,4}?(?:to|would|will|does\s+it\s+take\s+to|do\s+i\s+need\s+to|should\s+i\s+take\s+to)"
        r"\s+(?:kill\s+myself|die|end\s+my\s+life|overdose|od)\b")
    add("s11.lethal_dose_self", "S11", "high", "lethal~dose",
        r"\blethal\s+dose\b[^.!?\n]{0,40}?\b(?:for\s+me|kill\s+myself|to\s+die|end\s+my\s+life|myself)\b")
    add("s11.intent", "S11", "medium", "myself die end~it~all my~life suicid no~reason~to~live",
        r"\bi\s*(?:'m|am)?\s*(?:want|wanna|going|gonna|plan(?:ning)?|intend|need|ready)\s+(?:to\s+)?"
        r"(?:kill\s+myself|die(?!\s+(?:of|from|for|laughing|happy|old))|end\s+(?:it\s+all|my\s+life)|"
        r"commit\s+suicide|hurt\s+myself|cut\s+myself)\b"
        r"|\bi\s*(?:'m|am)\s+suicidal\b|\bno\s+reason\s+to\s+live\b", score=0.9)
    add("s11.pro_ed", "S11", "medium", "thinspo ana mia", r"\b(?:thinspo|thinspiration|pro-?ana|pro-?mia)\b")

    # S7: privacy. Doxxing requests block; stalking phrasing is medium.
    add("s7.dox_request", "S7", "high", "dox",
        r"\b(?:(?:how\s+(?:to|do\s+i|can\s+i)|help\s+me|i\s+want\s+to|can\s+you|let'?s|please)\s+dox+(?:ing)?"
        r"|dox+\s+(?:him|her|them|this\s+(?:guy|girl|person|user|account)|my\s+\w+|someone|somebody))\b")
    add("s7.find_private_info", "S7", "high", "address phone number cell mobile email social~security ssn lives",
        r"\b(?:find|get|look\s+up|track\s+down|locate|give\s+me|tell\s+me|what\s+is|what'?s|share|post|leak|"
        r"publish|dig\s+up)\s+(?:out\s+)?(?:(?!my\s+own\b|your\b|my\s+(?:home|personal|private|cell|mobile|social)\b)"
        r"[\w'-]+\s+){0,2}?(?:home\s+address(?:es)?|"
        r"(?:personal|private|cell|mobile)\s+(?:phone\s+)?(?:numbers?|address(?:es)?|emails?)|"
        r"social\s+security\s+numbers?|ssns?|where\s+(?:he|she|they|my\s+\w+|this\s+(?:guy|girl|person|user))\s+"
        r"lives?)\b")
    add("s7.track_person", "S7", "medium", "track spy monitor follow knowing knowledge consent",
        REQ + _fill(1) + r"(?:track|spy\s+on|monitor|follow)\s+(?:my\s+)?(?:ex|wife|husband|girlfriend|"
        r"boyfriend|partner|spouse|someone|somebody)(?:'?s)?\b|\bwithout\s+(?:her|his|their|them|him)\s+"
        r"(?:knowing|knowledge|consent)\b")

    # S13: fake voting channels (voter suppression).
    add("s13.fake_vote_channel", "S13", "high", "vote ballot",
        r"\byou\s+can\s+(?:now\s+|also\s+)?vote\s+(?:by|via|through|over|on)\s+(?:text|sms|text\s+message|tweet|"
        r"twitter|facebook|instagram|whatsapp)\b|\btext\s+(?:your\s+)?(?:vote|ballot)\s+"
        r"(?:for\s+\w+\s+)?to\s+\d{3,6}\b")

    # S1, S2, S3, S10, S12, S14, S8: medium rules; the classifier decides the rest.
    add("s1.harm_person", "S1", "medium",
        "kill murder poison strangl stab shoot assassin tortur kidnap abduct behead suffocat drown beat~up attack "
        "maim run~over",
        REQ + _fill(2) + _any("""kill killing murder murdering poison poisoning strangle strangling stab stabbing
                              shoot shooting assassinate assassinating torture torturing kidnap kidnapping abduct
                              behead suffocate suffocating drown drowning beat_up attack maim run_over""")
        + r"\s+(?:(?:my|his|her|their|our|a|an|the|this|that|some|[\w'-]+'s)\s+){0,2}" + PERSON + r"\b(?!'s)")
    add("s1.hitman", "S1", "medium", "hitman hit~man killer assassin hitmen get~away untraceable",
        r"\b(?:hire|find|pay|contact)\s+(?:a\s+)?(?:hitman|hit\s+man|contract\s+killer|assassin)\b|"
        r"\b(?:hitmen|hitman)\s+for\s+hire\b|\bget\s+away\s+with\s+(?:murder|killing)\b|\buntraceable\s+poisons?\b")
    add("s1.attack_plan", "S1", "medium", "shooting attack stabbing bombing",
        r"\b(?:plan|planning|carry\s+out|commit|organi[sz]e)\s+(?:a\s+)?(?:school|mass|terrorist)\s+"
        r"(?:shooting|attack|stabbing|bombing)\b", score=0.9)
    add("s2.drugs", "S2", "medium", "meth crack heroin fentanyl lsd mdma ecstasy cocaine ghb pcp dmt",
        REQ + _fill(2) + r"(?:make|cook|synthesi[sz]e|produce|manufacture|brew)\s+(?:[\w'-]+\s+)?"
        + _any("meth methamphetamine crystal_meth crack_cocaine crack heroin fentanyl lsd mdma ecstasy cocaine ghb "
               "pcp dmt") + r"\b")
    add("s2.crime_howto", "S2", "medium", "launder shoplift evade dodge hotwire hack break steal",
        REQ + _fill(2) + r"(?:launder(?:ing)?\s+(?:[\w'-]+\s+)?(?:money|cash|funds|proceeds)|shoplift(?:ing)?|"
        r"evade\s+taxes|dodge\s+taxes|hotwire\s+a\s+car|(?:hack|break)\s+into\s+(?:someone'?s?|another\s+"
        r"person'?s|other\s+people'?s|(?:my\s+)?(?:ex|wife|husband|girlfriend|boyfriend|partner|boss|neighbou?r|"
        r"teacher|coworker)'?s?|her|his|their|a|an|the)\s+(?:[\w'-]+\s+)?(?:account|email|phone|instagram|"
        r"facebook|snapchat|whatsapp|wifi|network|computer|bank|server|website|database)|steal\s+(?:(?:a|an|the|"
        r"someone'?s|people'?s|my\s+\w+'?s)\s+)?(?:cars?|identit(?:y|ies)|credit\s+cards?|wallets?|bikes?|"
        r"packages?|catalytic\s+converters?|money|from))\b")
    add("s2.counterfeit", "S2", "medium", "fake counterfeit without",
        r"\b(?:make|making|print|printing|produce)\s+(?:fake|counterfeit)\s+(?:money|bills|currency|cash|"
        r"dollars|notes|banknotes)\b|\b(?:buy|get|order|purchase)\s+(?:a\s+)?(?:gun|firearm|weapon|drugs|cocaine|"
        r"heroin|meth|fentanyl)\s+without\s+(?:a\s+)?(?:background\s+check|licen[cs]e|id|prescription)\b")
    add("s3.spike_drink", "S3", "medium", "drink",
        r"\b(?:roofie|roofy|spike|spiking|drug|drugging)\s+(?:her|his|their|someone'?s|somebody'?s|"
        r"a\s+(?:girl|woman|guy|man)'?s|my\s+\w+'?s)\s+drinks?\b", score=0.9)
    add("s3.assault_howto", "S3", "medium", "rape sexually molest grope",
        REQ + _fill(2) + r"(?:rape|sexually\s+assault|molest|grope)\b", score=0.9)
    add("s3.nonconsensual_images", "S3", "medium", "revenge deepfake fake~nude undress",
        r"\b(?:make|create|generate|post|share|upload|spread|leak)\s+(?:[\w'-]+\s+){0,2}?(?:revenge\s+porn|"
        r"deepfake\s+(?:porn|nudes)|fake\s+nudes)\b|\bundress\s+(?:her|him|this\s+(?:photo|picture|image|girl|"
        r"woman)|a\s+photo\s+of|someone)\b")
    add("s10.eliminate_group", "S10", "medium", "GROUP",
        r"\b(?:kill|exterminate|gas|eradicate|wipe\s+out|lynch|purge|cleanse|get\s+rid\s+of)\s+(?:all|every)\s+"
        r"(?:(?:of\s+)?the\s+)?" + GROUP + r"\b|\b" + GROUP + r"\s+(?:should|must|deserve\s+to|need\s+to|"
        r"ought\s+to)\s+(?:all\s+)?(?:die|be\s+(?:killed|exterminated|gassed|eradicated|wiped\s+out|lynched|"
        r"shot|hanged|sterili[sz]ed))\b", score=0.9)
    add("s10.dehumanize", "S10", "medium", "GROUP",
        r"\b" + GROUP + r"\s+are\s+(?:all\s+)?(?:subhuman|vermin|parasites|cockroaches|rats|animals|a\s+disease|"
        r"inferior)\b")
    add("s12.explicit_request", "S12", "medium",
        "explicit erotic x-rated nsfw pornographic smut dirty steamy raunchy",
        r"\b(?:write|describe|create|generate|give\s+me|tell\s+me)\s+(?:me\s+)?(?:(?:a|an|some|the)\s+)?"
        r"(?:[\w'-]+\s+){0,2}?(?:explicit|erotic|x-rated|nsfw|pornographic|smutty|dirty|steamy|raunchy)\s+"
        r"(?:sex\s+|sexual\s+|love\s+)?(?:story|stories|scenes?|fanfic|fan\s+fiction|roleplay|role-play|"
        r"description|content|poem|chat|talk)\b")
    add("s14.destructive_command", "S14", "medium", "rm~- :() /dev/ mkfs",
        r"\brm\s+-(?:rf|fr)\s+(?:--no-preserve-root\s+)?/(?:\*|\s|$)|:\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:|"
        r"\bbash\s+-i\s+>&\s*/dev/tcp/|\bnc\s+(?:-\w+\s+)*-e\s+/bin/(?:ba)?sh\b|\bdd\s+if=/dev/(?:zero|urandom)\s+"
        r"of=/dev/[sh]d[a-z]\b|\bmkfs(?:\.\w+)?\s+/dev/[sh]d[a-z]\b", score=0.45, flags=re.I | re.M)
    add("s14.sandbox_escape", "S14", "medium", "sandbox container interpreter jail chroot",
        r"\b(?:escape|break\s+out\s+of|bypass)\s+(?:the\s+|your\s+)?(?:sandbox|container|code\s+interpreter|"
        r"jail|chroot)\b")
    add("s8.verbatim_request", "S8", "medium", "full entire complete whole all~the",
        r"\b(?:give|print|reproduce|write\s+out|show|tell|recite|type\s+out|copy|paste)\s+(?:me\s+)?(?:the\s+)?"
        r"(?:full|entire|complete|whole|all\s+the)\s+(?:lyrics|text|script|transcript|chapter|book|novel)\s+"
        r"(?:of|to|for|from)\b", score=0.6)

    # Detectors.
    add("pii.email", "pii", "medium", "@",
        r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", score=0.9)
    add("pii.phone", "pii", "medium", "DIGITS",
        r"(?<![\w+])(?:\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}|\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4})(?![\w])",
        score=0.7, valid=lambda s: 10 <= sum(c.isdigit() for c in s) <= 15)
    add("pii.card", "pii", "medium", "DIGITS", r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])", score=1.0, valid=card_ok)
    add("pii.iban", "pii", "medium", "DIGITS",
        r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", score=1.0, valid=iban_ok, flags=0)
    add("pii.ssn", "pii", "medium", "-", r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b", score=0.8)
    add("secret.api_key", "secret", "medium",
        "sk- sk_ rk_ xai- akia asia ghp_ gho_ ghu_ ghs_ ghr_ github_pat_ xox aiza hf_ glpat- eyj",
        r"\b(?:sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}|[sr]k_(?:live|test)_[A-Za-z0-9]{20,}|"
        r"xai-[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{50,}|"
        r"xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,}|"
        r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})", score=1.0, flags=0)
    add("secret.private_key", "secret", "medium", "private~key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END [A-Z0-9 ]*-----)?", score=1.0,
        flags=0)
    add("profanity.lexicon", "profanity", "low",
        "fuck motherf f* shit bullshit bitch asshole bastard cunt dickhead wanker twat slut whore damn goddamn crap",
        r"\b(?:\w*fuck\w*|f\*+k\w*|shit\w*|bullshit|bitch\w*|asshole\w*|bastards?|cunts?|dickheads?|wankers?|"
        r"twats?|sluts?|whores?|goddamn\w*|damn\w*|crap\w*)\b", score=0.6)
    return rules


def _needs(words: str) -> tuple[str, ...]:
    return tuple(w.replace("~", " ") for w in _TRIGGERS.get(words, words).split())  # '~' stands for a space


_TRIGGERS = {  # shared trigger lists
    "CBRNE": """sarin soman tabun vx novichok mustard nerve weapon bioweapon bio-weapon biological anthrax ricin
             abrin botulinum smallpox variola plague pestis ebola marburg bomb nuclear radiological uranium
             plutonium vest ~ied ieds improvised tatp peroxide hmtd petn rdx semtex""",
    "GROUP": """jew muslim christian black white gay lesbian trans immigrant mexican arab asian hindu sikh roma gyps
             women refugee african indian chinese latino hispanic catholic atheist disabled""",
    "DIGITS": "0 1 2 3 4 5 6 7 8 9",
}


def luhn_ok(number: str) -> bool:
    """Luhn checksum of the digits in `number` (13-19 of them)."""
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3(?:0[0-5]|[68])|6(?:011|5)|35")


def card_ok(number: str) -> bool:
    """Luhn-valid and starts like a Visa, Mastercard, Amex, Discover, Diners or JCB number."""
    digits = "".join(c for c in number if c.isdigit())
    return bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def iban_ok(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to 10..35, remainder mod 97 is 1."""
    s = text.replace(" ", "").upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


RULES = _rules()

# Trigger look-up: a substring search per trigger costs ~250 scans of the text, so a trigger is first matched by
# its first <= 4 letters against the starts of the text's words; only those candidates get a substring search.
_TOKEN = re.compile(r"[a-z0-9]+")


def _key(word: str) -> str | None:
    head = re.match(r"[a-z0-9]{1,4}", word)
    return head.group() if head else None


_NEED_KEYS = [(word, _key(word)) for word in sorted({w for rule in RULES for w in rule.needs})]


def _present(lower: str) -> set[str]:
    """The rule triggers that occur in `lower`, each at the start of a word (or anywhere, for punctuation ones)."""
    heads = {token[:k] for token in set(_TOKEN.findall(lower)) for k in (1, 2, 3, 4)}
    return {word for word, key in _NEED_KEYS if (key is None or key in heads) and word in lower}


# ---- benign homonyms and discussion contexts ------------------------------------------------------------

_TECH = _any(
    """process(?:es)? tasks? threads? jobs? programs? apps? applications? daemons? services? sessions? servers?
    child_process(?:es)? parent_process(?:es)? child_threads? containers? pods? workers? pids? quer(?:y|ies)
    connections? commands? scripts? switch(?:es)? lights? engines?
    music noise weeds? bacteria germs mold mould mildew viruses mosquito(?:e?s)? flies fleas ants roaches
    cockroaches bugs pests lice termites rats mice slugs aphids wasps spiders"""
)
_NOT_PERSON = r"(?:(?!" + PERSON + r"\b)[\w.'/-]+\s+){0,3}?"
_DET = r"(?:(?:a|an|the|some|my|your|our|this|that|these|those|it|them|me|him|her|us|up)\s+)?"
_ADJ = r"(?:[\w'-]+\s+)?"

# (trigger substrings, pattern whose group v, v2, ... is the alarming word, neutral word for the classifier's copy)
_BENIGN_TABLE = [
    ("kill terminat nuke", r"\b(?P<v>kill(?:s|ed|ing)?|terminat(?:e|es|ed|ing)|nuke)\s+" + _NOT_PERSON + _TECH + r"\b",
     "stop"),
    ("shoot shot", r"\b(?P<v>shoot(?:s|ing)?|shot)\s+" + _DET + _ADJ + r"(?:photos?|pictures?|pics?|videos?|films?|"
     r"movies?|scenes?|footage|portraits?|weddings?|photoshoots?|commercials?|documentar(?:y|ies)|hoops?|baskets?|"
     r"the\s+breeze|emails?|messages?|texts?|dms?|lines?|notes?|questions?|your\s+shot|for\s+the\s+(?:stars|moon))\b",
     "take"),
    ("execut", r"\b(?P<v>execut(?:e|es|ed|ing))\s+" + _DET + r"(?:[\w.'-]+\s+){0,2}?(?:scripts?|commands?|code|"
     r"programs?|quer(?:y|ies)|functions?|plans?|orders?|trades?|tasks?|jobs?|tests?|strateg(?:y|ies)|contracts?|"
     r"wills?|statements?|instructions?|binar(?:y|ies)|files?|steps?|workflows?|transactions?|sql|notebooks?|cells?|"
     r"pipelines?|moves?|payments?|requests?|migrations?)\b", "run"),
    ("blow blew", r"\b(?P<v>blow(?:s|ing|n)?\s+up|blew\s+up)\s+" + _DET + _ADJ + r"(?:balloons?|air\s+mattress(?:es)?|"
     r"tires?|tyres?|pool\s+floats?|floats?|inflatables?|beach\s+balls?|photos?|pictures?|images?|pics?|phone|"
     r"inbox)\b", "inflate"),
    ("gut", r"\b(?P<v>gut(?:ting|ted)?)\s+" + _DET + _ADJ + r"(?:fish|trout|salmon|bass|deer|chicken|turkey|rabbit|"
     r"catch|pumpkin|kitchen|house|bathroom)\b", "clean"),
    ("nuk", r"\b(?P<v>nuke|nuking|nuked)\s+" + _DET + _ADJ + r"(?:leftovers?|food|pizza|soup|coffee|tea|meal|dinner|"
     r"lunch|burrito|popcorn|in\s+the\s+microwave|account|repo|database|directory|folder|cache|branch)\b", "heat"),
    ("hang hung", r"\b(?P<v>hang(?:ing)?|hung)\s+" + _DET + _ADJ + r"(?:pictures?|paintings?|frames?|posters?|"
     r"shel(?:f|ves)|curtains?|mirrors?|tv|art|artwork|clothes|laundry|lights|decorations?|coats?|jackets?|"
     r"hammocks?|plants?)\b|\b(?P<v2>hang(?:ing)?|hung)\s+(?:out|up\s+the\s+phone|in\s+there|on\s+a\s+"
     r"(?:sec|second|minute))\b", "put"),
    ("attack", r"\b(?P<v>attack(?:s|ed|ing)?)\s+" + _DET + _ADJ + r"(?:problems?|questions?|tasks?|issues?|"
     r"challenges?|puzzles?|bugs?|backlog)\b|\b(?:heart|panic|anxiety|asthma|migraine)\s+(?P<v2>attacks?)\b",
     "episode"),
    ("bomb", r"\b(?P<v>bomb(?:s|ed|ing)?)\s+" + _DET + _ADJ + r"(?:tests?|exams?|interviews?|presentations?|"
     r"auditions?|quiz(?:zes)?|dates?|gigs?)\b|\b(?:bath|seed|glitter|calorie|flavou?r|truth|stink|f|yarn|love|"
     r"smoke)[\s-]?(?P<v2>bombs?|bombing)\b|\b(?P<v3>photobomb\w*)", "flop"),
    ("kill slay crush murder destroy dressed", r"\b(?P<v>kill(?:ing)?|slay(?:ing|ed)?|crush(?:ing|ed)?|"
     r"murder(?:ing|ed)?|destroy(?:ing|ed)?)\s+(?:it\b|the\s+(?:competition|exam|interview|game|presentation|"
     r"audition|set|workout|dance\s+floor)\b|that\s+(?:test|exam|interview)\b)|\b(?P<v2>kill(?:ing)?)\s+time\b|"
     r"\b(?P<v3>killer)\s+(?:apps?|features?|deals?|ideas?|looks?|workouts?|views?|smiles?|instinct|tunes?|songs?|"
     r"riffs?)\b|\bdressed\s+to\s+(?P<v4>kill)\b|\b(?P<v5>kill)\s+two\s+birds\s+with\s+one\s+stone\b|"
     r"\b(?P<v6>kill(?:s|ing)?)\s+the\s+(?:mood|vibe|buzz)\b|\b(?:is|are|was|were)\s+(?P<v7>killing)\s+me\b", "ace"),
    ("steal stole", r"\b(?P<v>steal(?:s|ing)?|stole)\s+(?:the\s+show|the\s+spotlight|(?:a|second|third|home)\s+base|"
     r"bases|a\s+glance|a\s+kiss|(?:someone'?s|my|your|her|his)\s+heart|a\s+look|the\s+scene|(?:my|your)\s+"
     r"thunder)\b", "win"),
    ("stab", r"\b(?:take|took|taking|have|had)\s+a\s+(?P<v>stab)\s+at\b", "try"),
    ("poison", r"\b(?P<v>poison)\s+(?:ivy|oak|pill|dart\s+frogs?)\b|\b(?:food|lead|carbon\s+monoxide|alcohol|"
     r"mercury|mushroom)\s+(?P<v2>poisoning)\b", "common"),
    ("beat", r"\b(?P<v>beat(?:s|ing|en)?)\s+(?:the|a|my|your|an)\s+" + _ADJ + r"(?:eggs?|egg\s+whites|cream|batter|"
     r"heat|traffic|records?|odds|game|level|boss|deadline|system|competition|clock|rush|crowds?|high\s+score|"
     r"drums?|market)\b", "handle"),
    ("drown", r"\b(?P<v>drown(?:s|ing|ed)?)\s+out\b", "block"),
    ("murder assassin", r"\b(?P<v>murder)\s+(?:mystery|mysteries|podcast|documentary|ballad|hornets?)\b|"
     r"\b(?P<v2>assassin)'?s\s+creed\b", "crime"),
    ("hack", r"\blife\s+(?P<v>hacks?)\b|\b(?P<v2>hack(?:ing)?)\s+together\b", "tips"),
    ("crack", r"\b(?P<v>crack(?:s|ed|ing)?)\s+(?:an?\s+)?(?:eggs?|jokes?|smile|window|knuckles?|nuts?)\b", "open"),
    ("suicide", r"\b(?:career|social|political|commercial)\s+(?P<v>suicide)\b|\b(?P<v2>suicide)\s+(?:squad|"
     r"squeeze|doors?|lanes?)\b", "risk"),
    ("dying", r"\b(?P<v>dying)\s+to\s+(?:see|know|try|meet|hear|go|watch|read|get)\b", "eager"),
    ("extermin", r"\b(?P<v>exterminat(?:e|or|ors|ing))\s+(?:(?:for|the|my|of)\s+)?(?:termites?|roaches|cockroaches|"
     r"rats|mice|pests|bugs|ants|bed\s?bugs)\b|\b(?:an?|the)\s+(?P<v2>exterminators?)\b", "treat"),
]
_BENIGN = [(tuple(needs.split()), re.compile(p, re.I), word) for needs, p, word in _BENIGN_TABLE]

_CONTEXT = re.compile(
    r"^\W*(?:what|who)\s+(?:is|are|was|were)\s+(?:a\s+|an\s+|the\s+)?[\w\s'-]{1,40}?\W*$"
    r"|\b(?:define|definition\s+of|meaning\s+of|what\s+does\s+[\w\s'-]{1,30}\s+mean|what\s+is\s+meant\s+by)\b"
    r"|\b(?:history\s+of|historical(?:ly)?|in\s+(?:1[0-9]|20)\d\d|in\s+the\s+(?:1[0-9]|20)\d0s|during\s+"
    r"(?:world\s+war|ww\s*(?:ii?|1|2)|the\s+(?:war|holocaust|cold\s+war|genocide|civil\s+war))|why\s+did|"
    r"how\s+did\s+(?:the|they|he|she)|what\s+happened\s+(?:at|in|during|to))\b"
    r"|\b(?:in\s+(?:my|a|the|this|our)\s+(?:novel|story|book|screenplay|script|film|movie|tv\s+show|show|series|"
    r"play|poem|fanfic|fan\s+fiction|comic|manga|anime|campaign|fiction|(?:video\s+)?game)|fictional|fictitious|"
    r"minecraft|fortnite|call\s+of\s+duty|gta\s*(?:v|5)?|grand\s+theft\s+auto|skyrim|elden\s+ring|the\s+sims|"
    r"roblox|among\s+us|valorant|counter-?strike|overwatch|league\s+of\s+legends|dnd|d&d|dungeons\s+(?:and|&)\s+"
    r"dragons|board\s+game)\b"
    r"|\b(?:according\s+to|news|reported|reports?\s+(?:say|said|that)|article|headlines?|documentary|"
    r"was\s+(?:arrested|convicted|charged|sentenced|found\s+guilty)|trial|court|lawsuit|legal|laws?|penalt(?:y|ies)|"
    r"age\s+of\s+consent|statutory)\b",
    re.I | re.M,
)


def benign_spans(text: str, lower: str | None = None) -> list[tuple[int, int]]:
    """Spans of benign homonyms ("kill a process", "shoot a photo", ...)."""
    lower = text.lower() if lower is None else lower
    return [m.span() for needs, pattern, _ in _BENIGN if _has(lower, needs) for m in pattern.finditer(text)]


def in_context(text: str) -> bool:
    """True for definition/history questions and fiction, game, news or legal discussion."""
    return _CONTEXT.search(text) is not None


def neutralize(text: str) -> str:
    """Copy of `text` with the alarming word of each benign homonym replaced ("kill a process" -> "stop a process")."""
    lower = text.lower()
    for needs, pattern, word in _BENIGN:
        if _has(lower, needs):
            text = pattern.sub(lambda m, word=word: _swap(m, word), text)
    return text


def _swap(m: re.Match, word: str) -> str:
    name = next(k for k, v in m.groupdict().items() if v is not None)
    start, end = m.start(name) - m.start(), m.end(name) - m.start()
    return m.group()[:start] + word + m.group()[end:]


def _has(lower: str, needs: tuple[str, ...]) -> bool:
    return any(word in lower for word in needs)


def find_hits(text: str, detectors: bool = True, view: int = 0) -> list[Hit]:
    """Rule hits in `text`; `detectors=False` skips the PII / secret / profanity detectors."""
    lower = text.lower()
    present = _present(lower)
    hits: list[Hit] = []
    benign: list[tuple[int, int]] | None = None
    context: bool | None = None
    for rule in RULES:
        if (rule.code in SIGNALS and not detectors) or present.isdisjoint(rule.needs):
            continue
        for m in rule.pattern.finditer(text):
            if rule.valid is not None and not rule.valid(m.group()):
                continue
            score = rule.score
            if rule.severity != "high" and rule.code not in SIGNALS:
                benign = benign_spans(text, lower) if benign is None else benign
                if any(s < m.end() and m.start() < e for s, e in benign):
                    continue
                context = in_context(text) if context is None else context
                score *= CONTEXT_FACTOR if context else 1.0
            hits.append(Hit(rule.code, score, rule.name, rule.severity, m.span(), view))
    return hits


def find_pii(text: str, kinds: tuple[str, ...] = ("pii", "secret")) -> list[Hit]:
    """PII and secret hits on raw text (no normalisation), e.g. for redaction."""
    lower = text.lower()
    return [
        Hit(rule.code, rule.score, rule.name, rule.severity, m.span())
        for rule in RULES if rule.code in kinds and _has(lower, rule.needs)
        for m in rule.pattern.finditer(text)
        if rule.valid is None or rule.valid(m.group())
    ]


def canonical(value: str) -> str:
    """Comparable form of a PII value: lower-case emails, upper-case alphanumerics of numbers and keys."""
    if "@" in value:
        return value.strip().lower()
    return "".join(c for c in value if c.isalnum()).upper()
