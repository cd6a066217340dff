"""Prompt templates and their rendering through a model's chat template.

Every template is a field of `PromptTemplates`, so a config can swap in other texts (the
paper's own, say) without code changes. Templates use `str.format` placeholders.

The annotation prompt is rendered as segments, [head][post][comment][question], because the
head (instructions + few-shot example) is shared by every response, the post by every
response of a thread, and the comment by the 90 questions of one response: engines use the
segments to compute each shared prefix once. Token ids are always the concatenation of the
segments' ids, in every engine, so all engines score exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from alignx_ray.common.space import SPACE, Dimension, PreferenceSpace

PROMPT_VERSION = "v2"

ANNOTATION_TEMPLATE = """Read a forum post and one comment written in reply to it. Then answer one question about the person who wrote the comment by giving the number of the best option only.

{example}Your task:

Query:
{post}

Comment:
{comment}

Task:
{question}

Response:"""

EXAMPLE_POST = (
    "Finally finished repainting the spare room after three weekends. We went with a pale "
    "green and the light in there is completely different now."
)
EXAMPLE_COMMENT = (
    "Looks lovely! I planned every coat of ours on a spreadsheet and still managed to get paint "
    "on the dog. Painting is honestly my favourite way to spend a Sunday."
)
# (dimension name, answer option) for the few-shot block: one High, one Likes, one unreflected.
EXAMPLE_ANSWERS = (
    ("Degree of Conscientiousness in the Big Five personality traits", 1),
    ("painting", 1),
    ("Need for Seclusion (desire for isolation from others, maintaining privacy)", 3),
)

DEMOGRAPHIC_TEMPLATE = """Who is likely to prefer <Response 1> over <Response 2>? Compare the two responses to the query and describe such a person using only the dimensions below that the comparison actually reveals, each with one of its two labels:

{dimension_list}

Then pick keywords for what this person likes and dislikes, only from this list, and leave them empty when nothing fits:
{keyword_list}

Query:
{post}

<Response 1>
{response_1}

<Response 2>
{response_2}

Answer with one JSON object with the keys "reason" (why), "textual persona" (a short description of the person), "dimension description" (an object from dimension name to label), "like keywords" and "dislike keywords" (comma-separated)."""

# The judge (Table 3) and the binary-choice question (Table 10) show the same material.
TWO_RESPONSES = """User history:
{history}

Query:
{query}

Response A:
{response_a}

Response B:
{response_b}

"""
JUDGE_TEMPLATE = (
    "A user's earlier behaviour shows what they like. For their new query, decide which response fits their "
    "needs and preferences better; a tie is allowed.\n\n"
    + TWO_RESPONSES
    + 'Answer with one JSON object: {{"choice": "Response A"}}, {{"choice": "Response B"}} or {{"choice": "Tie"}}.'
)
BINARY_CHOICE_TEMPLATE = (
    "A user's earlier behaviour shows what they like. For their new query, decide which of the two responses "
    "this user prefers.\n\n"
    + TWO_RESPONSES
    + 'Answer with one JSON object: {{"choice": "Response A"}} or {{"choice": "Response B"}}.'
)

# The released AlignXpert formats (Appendix B.2): official checkpoints expect exactly these.
ICA_SYSTEM = "Generate a task-specific response based on user historical behavior and preferences.\n"
PBA_SYSTEM = "Generate a task-specific response based on user preferences.\n"
ICA_USER = (
    "***Task***\n\n**Post:**\n{prompt}\n\n"
    "***Historical Behavior and User Preferences***\n\n{history}\n\n***Response:***\n\n"
)
PBA_USER = "***Task***\n\n**Post:**\n{prompt}\n\n***User Preferences***\n\n{profile}\n\n***Response:***\n\n"
UGC_HEADER = "**This person has commented on some posts:**\n\n"
UGC_ITEM = "{n}. *Post:*\n{prompt}\n\n*Comment:*\n{comment}\n\n"
PAIR_HEADER = "**This person has chosen or rejected comments on some posts:**\n\n"
PAIR_ITEM = "{n}. *Post:*\n{prompt}\n\n*Chosen:*\n{chosen}\n\n*Rejected:*\n{rejected}\n\n"
DEMO_ITEM = "**This person's persona is:**\n\n{text}"


class PromptTemplates(BaseModel):
    """All prompt texts; override any of them from a config's `prompts:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = PROMPT_VERSION
    annotation: str = ANNOTATION_TEMPLATE
    annotation_example: str | None = None  # None: built from EXAMPLE_* and the space
    question: str = "{question} (1) {option_1} (2) {option_2} (3) {option_3}"
    demographic: str = DEMOGRAPHIC_TEMPLATE
    judge: str = JUDGE_TEMPLATE
    binary_choice: str = BINARY_CHOICE_TEMPLATE
    ica_system: str = ICA_SYSTEM
    ica_user: str = ICA_USER
    pba_system: str = PBA_SYSTEM
    pba_user: str = PBA_USER
    ugc_header: str = UGC_HEADER
    ugc_item: str = UGC_ITEM
    pair_header: str = PAIR_HEADER
    pair_item: str = PAIR_ITEM
    demo_item: str = DEMO_ITEM


def render_chat(tokenizer, user: str, system: str | None = None) -> str:
    """The text a chat model sees for one user turn, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_question(dim: Dimension, templates: PromptTemplates) -> str:
    o1, o2, o3 = dim.options
    return templates.question.format(question=dim.question, option_1=o1, option_2=o2, option_3=o3)


def annotation_example(templates: PromptTemplates, space: PreferenceSpace = SPACE) -> str:
    """The few-shot block: one post, one comment, a few answered questions."""
    if templates.annotation_example is not None:
        return templates.annotation_example
    by_name = {d.name: d for d in space}
    tasks = "".join(
        f"Task:\n{format_question(by_name[name], templates)}\n\nResponse:\n{answer}\n\n"
        for name, answer in EXAMPLE_ANSWERS
    )
    return f"Example:\n\nQuery:\n{EXAMPLE_POST}\n\nComment:\n{EXAMPLE_COMMENT}\n\n{tasks}"


_SENTINELS = ("\x00POST\x00", "\x00COMMENT\x00", "\x00QUESTION\x00")


@dataclass(frozen=True)
class AnnotationLayout:
    """The rendered annotation prompt cut at its shared-prefix boundaries.

    prompt(post, comment, q) == head + post_part(post) + comment_part(comment) + branch(q)
    """

    head: str
    after_post: str
    after_comment: str
    after_question: str

    def post_part(self, post: str) -> str:
        return post + self.after_post

    def comment_part(self, comment: str) -> str:
        return comment + self.after_comment

    def branch(self, question: str) -> str:
        return question + self.after_question


def annotation_layout(tokenizer, templates: PromptTemplates, space: PreferenceSpace = SPACE) -> AnnotationLayout:
    """Render once with sentinels and cut; works for any chat template."""
    user = templates.annotation.format(
        example=annotation_example(templates, space),
        post=_SENTINELS[0],
        comment=_SENTINELS[1],
        question=_SENTINELS[2],
    )
    text = render_chat(tokenizer, user)
    head, rest = text.split(_SENTINELS[0])
    after_post, rest = rest.split(_SENTINELS[1])
    after_comment, after_question = rest.split(_SENTINELS[2])
    return AnnotationLayout(head, after_post, after_comment, after_question)


def option_token_ids(tokenizer) -> list[int]:
    """Token ids of the answers '1', '2', '3'; each must be a single token."""
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in "123"]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits the option digits: {ids}")
    return [i[0] for i in ids]


def demographic_dimension_list(space: PreferenceSpace = SPACE) -> str:
    """Prompt #2's numbered list: the labelled dimensions, with free-text Occupation third."""
    entries = [f'{d.name}: ("{d.demo_labels[0]}", "{d.demo_labels[1]}")' for d in space.demo_dimensions()]
    entries.insert(2, "Occupation")
    return "\n".join(f"{i}. {e}" for i, e in enumerate(entries, 1))


def demographic_prompt(
    templates: PromptTemplates, post: str, response_1: str, response_2: str, space: PreferenceSpace = SPACE
) -> str:
    keywords = ", ".join(d.keyword for d in space.keyword_dimensions())
    return templates.demographic.format(
        dimension_list=demographic_dimension_list(space),
        keyword_list="{" + keywords + "}",
        post=post,
        response_1=response_1,
        response_2=response_2,
    )


def demographic_json_schema(space: PreferenceSpace = SPACE) -> dict:
    """JSON schema for structured decoding of Prompt #2's answer."""
    dims = {d.name: {"type": "string", "enum": list(d.demo_labels)} for d in space.demo_dimensions()}
    dims["Occupation"] = {"type": "string", "maxLength": 60}
    text = {"type": "string", "maxLength": 300}  # bounds the answer, so it always closes its JSON
    return {
        "type": "object",
        "properties": {
            "reason": text,
            "textual persona": text,
            "dimension description": {"type": "object", "properties": dims, "additionalProperties": False},
            "like keywords": text,
            "dislike keywords": text,
        },
        "required": ["reason", "textual persona", "dimension description", "like keywords", "dislike keywords"],
    }


def behaviour_history(templates: PromptTemplates, ugc: list[dict], pairs: list[dict], demographic: str = "") -> str:
    """The ICA history block (Appendix B.2): UGC items, then pair items, then the persona text."""
    parts = []
    if ugc:
        parts.append(
            templates.ugc_header
            + "".join(
                templates.ugc_item.format(n=i, prompt=u["prompt"], comment=u["comment"]) for i, u in enumerate(ugc, 1)
            )
        )
    if pairs:
        parts.append(
            templates.pair_header
            + "".join(
                templates.pair_item.format(n=i, prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"])
                for i, p in enumerate(pairs, 1)
            )
        )
    if demographic:
        parts.append(templates.demo_item.format(text=demographic))
    return "".join(parts).rstrip("\n")  # the template puts the blank line before the response


def ica_prompt(
    tokenizer, templates: PromptTemplates, prompt: str, ugc: list[dict], pairs: list[dict], demographic: str = ""
) -> str:
    history = behaviour_history(templates, ugc, pairs, demographic)
    return render_chat(tokenizer, templates.ica_user.format(prompt=prompt, history=history), templates.ica_system)


def pba_prompt(tokenizer, templates: PromptTemplates, prompt: str, profile: str) -> str:
    return render_chat(tokenizer, templates.pba_user.format(prompt=prompt, profile=profile), templates.pba_system)


def corpus_text() -> str:
    """The annotation prompt's own text, for training the tiny tokenizer on the words it uses.

    Only what the annotator reads: the tiny models (and the cached annotator keyed by this
    text) stay valid when other templates change; byte-level BPE encodes any other text.
    """
    t = PromptTemplates()
    return "\n".join([t.annotation, t.question, EXAMPLE_POST, EXAMPLE_COMMENT])
