"""The model's own chat template: ids and text equal to `transformers`' apply_chat_template on ChatML,
Llama 3 and Mistral style templates, the loss mask, template files, the encoder choice, stop ids, and
`glm generate --chat` on a checkpoint with a ChatML tokenizer."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import invoke_glm

from glm_cli.core.errors import CheckpointError, DataError
from glm_cli.core.tokens.chat import ChatEncoder
from glm_cli.core.tokens.chat_template import TemplateChatEncoder, chat_encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only add contention

# Short templates in the style of the public ones (written for these tests).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a small helpful model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The system message goes in front of the first user message; roles must alternate.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Like MISTRAL, but the system message joins the *last* user message: earlier prefixes render differently.
MISTRAL_LAST_SYSTEM = MISTRAL.replace("loop.first and system_message", "loop.last and system_message")

TEMPLATES = {
    "chatml": dict(template=CHATML, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos=None, eos="<|im_end|>", end="<|im_end|>"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", end="<|eot_id|>", post_bos=True),
    "mistral": dict(template=MISTRAL, specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", end="</s>"),
}

CORPUS = ("What is the capital of France? Paris is the capital. And of Italy? Rome, of course. Be brief. "
          "You are a small helpful model. Answer in one word.  Two  spaces, then\ttabs and\n\nnewlines.\n")
SYSTEM = {"role": "system", "content": "Be brief."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris is the capital."}
Q2 = {"role": "user", "content": "And of  Italy?\n"}
A2 = {"role": "assistant", "content": "Rome,  of course.\n\nAnswer: Rome"}
CONVERSATIONS = {
    "prompt": [Q1],
    "single": [Q1, A1],
    "multi": [Q1, A1, Q2, A2],
    "system": [SYSTEM, Q1, A1, Q2, A2],
    "system_prompt": [SYSTEM, Q1, A1, Q2],
}


def build_tokenizer(specials: list[str], post_bos: str | None = None):
    """A tiny byte-level BPE with the template's special tokens; optionally a Llama-3-like post-processor
    that adds BOS (and trims offsets, which the encoder must not be fooled by)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 10, trainer)
    if post_bos:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
                                          special_tokens=[(post_bos, tok.token_to_id(post_bos))]),
        ])
    return tok


def write_tokenizer_dir(directory, spec: dict, *, config_extra: dict | None = None, template_in_config=True):
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec["specials"], spec["bos"] if spec.get("post_bos") else None)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"], "eos_token": spec["eos"],
              "clean_up_tokenization_spaces": False}
    if template_in_config:
        config["chat_template"] = spec["template"]
    config.update(config_extra or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def reference(directory):
    """transformers' own tokenizer for the directory: the ground truth."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def glm_encoder(directory):
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    return chat_encoder_for(directory, load_tokenizer(directory))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {name: write_tokenizer_dir(root / name, spec) for name, spec in TEMPLATES.items()}


def test_hf_reference_is_built_from_the_same_tokenizer(dirs):
    """The reference must be transformers reading the same files (not glm's own format by accident)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    for name, spec in TEMPLATES.items():
        hf = reference(dirs[name])
        assert hf.chat_template == spec["template"]
        direct = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(dirs[name] / "tokenizer.json")),
                                         bos_token=spec["bos"], eos_token=spec["eos"], chat_template=spec["template"])
        messages = CONVERSATIONS["system"] if name != "mistral" else CONVERSATIONS["multi"]
        assert direct.apply_chat_template(messages, return_dict=False) == hf.apply_chat_template(
            messages, return_dict=False)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_apply_chat_template(dirs, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    hf = reference(dirs[name])
    encoder = glm_encoder(dirs[name])
    assert isinstance(encoder, TemplateChatEncoder)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                 add_generation_prompt=add_generation_prompt)
    assert encoder.render_text(messages, add_generation_prompt) == text
    rendered = encoder.render(messages, add_generation_prompt)
    assert rendered.ids == ids
    assert len(rendered.mask) == len(ids)
    if add_generation_prompt:
        assert encoder.prompt_ids(messages) == ids


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", ["single", "multi", "system"])
def test_mask_is_each_answer_and_its_end_of_turn_token(dirs, name, conversation):
    messages = CONVERSATIONS[conversation]
    encoder = glm_encoder(dirs[name])
    end = TEMPLATES[name]["end"]
    rendered = encoder.render(messages)
    runs, current = [], None
    for token, masked in zip(rendered.ids, rendered.mask, strict=True):
        if masked:
            current = (current or []) + [token]
        elif current is not None:
            runs.append(current)
            current = None
    if current is not None:
        runs.append(current)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if name == "llama3":  # its template trims every message
        answers = [a.strip() for a in answers]
    decode = encoder.tokenizer.decode
    assert [decode(run, skip_special_tokens=False) for run in runs] == [a + end for a in answers]
    assert rendered.n_response_tokens == sum(len(r) for r in runs)
    # ChatML's "\n" after <|im_end|> is not something the model is trained to emit
    if name == "chatml":
        assert not rendered.mask[-1] and decode(rendered.ids[-1:]) == "\n"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_and_response_split_the_rendering(dirs, name):
    encoder = glm_encoder(dirs[name])
    end_id = encoder.tokenizer.token_to_id(TEMPLATES[name]["end"])
    for messages in ([Q1], [Q1, A1, Q2]):
        prompt, response = encoder.prompt_and_response(messages, A1["content"])
        full = encoder.render(messages + [A1])
        assert prompt + response == full.ids[:len(prompt) + len(response)]
        assert response[-1] == end_id and all(full.mask[len(prompt):len(prompt) + len(response)])
        assert prompt == encoder.prompt_ids(messages)  # what generation feeds the model
    assert encoder.response_ids(A1["content"]) == response
    assert encoder.end_id == end_id


def test_template_that_rewrites_earlier_turns_is_refused_for_masking(tmp_path):
    spec = {**TEMPLATES["mistral"], "template": MISTRAL_LAST_SYSTEM}
    directory = write_tokenizer_dir(tmp_path / "tok", spec)
    encoder = glm_encoder(directory)
    with pytest.raises(DataError, match="loss masking"):
        encoder.render(CONVERSATIONS["system"])
    encoder.render(CONVERSATIONS["multi"])  # without a system message it is consistent
    # generation needs no mask: the prompt still renders, as transformers renders it
    hf = reference(directory)
    assert encoder.prompt_ids(CONVERSATIONS["system_prompt"]) == hf.apply_chat_template(
        CONVERSATIONS["system_prompt"], return_dict=False, add_generation_prompt=True)


def test_raise_exception_of_the_template_is_a_data_error_with_the_line(dirs, tmp_path):
    from glm_cli.core.tune.sft_data import load_examples

    encoder = glm_encoder(dirs["mistral"])
    with pytest.raises(DataError, match="roles must alternate"):
        encoder.render([Q1, Q1, A1])
    with pytest.raises(DataError, match="needs a role in"):
        encoder.render([{"role": "tool", "content": "x"}])
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [Q1, A1]}) + "\n" + json.dumps({"messages": [Q1, Q1, A1]}) + "\n")
    with pytest.raises(DataError, match="roles must alternate") as info:
        load_examples(str(data), encoder, 128)
    assert (info.value.source, info.value.line) == (str(data), 2)


def test_template_file_wins_and_list_form_picks_default(tmp_path):
    spec = TEMPLATES["chatml"]
    # chat_template.jinja beside a config that holds another template: the file is used (as transformers does)
    file_dir = write_tokenizer_dir(tmp_path / "file", spec, config_extra={"chat_template": LLAMA3})
    (file_dir / "chat_template.jinja").write_text(CHATML)
    # a list of named templates in tokenizer_config.json, with special tokens in their dict form
    list_dir = write_tokenizer_dir(tmp_path / "list", spec, config_extra={
        "chat_template": [{"name": "tool_use", "template": LLAMA3}, {"name": "default", "template": CHATML}],
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}})
    messages = CONVERSATIONS["system"]
    for directory in (file_dir, list_dir):
        hf = reference(directory)
        encoder = glm_encoder(directory)
        assert encoder.render_text(messages) == hf.apply_chat_template(messages, tokenize=False)
        assert encoder.render(messages, True).ids == hf.apply_chat_template(messages, return_dict=False,
                                                                             add_generation_prompt=True)
    assert glm_encoder(list_dir).variables["eos_token"] == "<|im_end|>"
    no_default = write_tokenizer_dir(tmp_path / "nodefault", spec,
                                     config_extra={"chat_template": [{"name": "tool_use", "template": CHATML}]})
    with pytest.raises(CheckpointError, match="no 'default'"):
        glm_encoder(no_default)


def test_special_token_variables_reach_the_template(tmp_path):
    """bos/eos from the config (string or dict); special_tokens_map.json as transformers reads it."""
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ mask_token }}|{{ messages[0]['content'] | tojson }}"
    spec = {**TEMPLATES["mistral"], "template": template}
    directory = write_tokenizer_dir(tmp_path / "tok", spec, config_extra={"bos_token": {"__type": "AddedToken",
                                                                                 "content": "<s>"}})
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>", "eos_token": "<x>",
                                                                  "mask_token": {"content": "<s>"}}))
    messages = [{"role": "user", "content": "<a & b>"}]
    encoder = glm_encoder(directory)
    assert encoder.render_text(messages) == '<s>|<x>|<unk>|<s>|"<a & b>"'
    assert encoder.render_text(messages) == reference(directory).apply_chat_template(messages, tokenize=False)
    # a config that lists its added tokens is the whole truth: transformers ignores the map then
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"0": {"content": "<unk>", "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    encoder = glm_encoder(directory)
    assert encoder.render_text(messages) == '<s>|</s>|||"<a & b>"'
    assert encoder.render_text(messages) == reference(directory).apply_chat_template(messages, tokenize=False)


def test_generation_tags_render_their_body(tmp_path):
    """Templates that mark answers with {% generation %} for transformers' own mask render as usual."""
    tagged = CHATML.replace(
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}")
    assert tagged != CHATML
    plain = glm_encoder(write_tokenizer_dir(tmp_path / "plain", TEMPLATES["chatml"]))
    directory = write_tokenizer_dir(tmp_path / "tagged", {**TEMPLATES["chatml"], "template": tagged})
    encoder = glm_encoder(directory)
    messages = CONVERSATIONS["system"]
    assert encoder.render_text(messages) == reference(directory).apply_chat_template(messages, tokenize=False)
    assert encoder.render(messages) == plain.render(messages)


def test_invalid_template_is_a_checkpoint_error(tmp_path):
    spec = {**TEMPLATES["chatml"], "template": "{% for m in messages %}{{ m['content'] }"}
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        glm_encoder(write_tokenizer_dir(tmp_path / "tok", spec))


def test_sandbox_blocks_python_internals(tmp_path):
    spec = {**TEMPLATES["chatml"], "template": "{{ messages.__class__.__mro__ }}{% set ns = namespace() %}"
                                               "{% set ns._x = 1 %}"}
    encoder = glm_encoder(write_tokenizer_dir(tmp_path / "tok", spec))
    with pytest.raises(DataError, match="rejects"):
        encoder.render_text([Q1])


def test_factory_picks_glm_format_for_glm_tokenizers(tmp_path):
    from eval_fixtures import make_tokenizer

    from glm_cli.core.tokens.tokenizer import load_tokenizer

    make_tokenizer(tmp_path / "glm")
    assert isinstance(chat_encoder_for(tmp_path / "glm", load_tokenizer(tmp_path / "glm")), ChatEncoder)
    (tmp_path / "glm" / "tokenizer_config.json").unlink()  # an older checkpoint: the role tokens decide
    assert isinstance(chat_encoder_for(tmp_path / "glm", load_tokenizer(tmp_path / "glm")), ChatEncoder)
    assert load_tokenizer(tmp_path / "glm").post_processor is None  # so add_special_tokens adds nothing

    foreign = write_tokenizer_dir(tmp_path / "foreign", TEMPLATES["chatml"], template_in_config=False)
    with pytest.raises(CheckpointError, match="no chat template") as info:
        glm_encoder(foreign)
    assert "\n" not in str(info.value) and "glm tokenize train" in str(info.value)


def test_glm_format_through_the_template_matches_chat_encoder(tmp_path):
    """glm's CHAT_TEMPLATE, run as a foreign template, gives ChatEncoder's ids and mask: the two agree."""
    from eval_fixtures import make_tokenizer

    from glm_cli.core.tokens.tokenizer import CHAT_TEMPLATE, load_tokenizer

    make_tokenizer(tmp_path / "glm")
    tok = load_tokenizer(tmp_path / "glm")
    ours, theirs = ChatEncoder(tok), TemplateChatEncoder(tok, CHAT_TEMPLATE)
    for messages in (CONVERSATIONS["system"], CONVERSATIONS["single"]):
        assert theirs.render(messages).ids == ours.render(messages).ids
        assert theirs.render(messages).mask == ours.render(messages).mask
        assert theirs.prompt_and_response(messages[:-1], "Rome.") == ours.prompt_and_response(messages[:-1], "Rome.")
    assert theirs.end_id == ours.end_id


def test_plain_prompt_gets_the_post_processors_bos(dirs):
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(dirs["llama3"])
    ids = tok.encode("What is the capital?", add_special_tokens=True).ids
    assert ids == reference(dirs["llama3"])("What is the capital?")["input_ids"]
    assert ids[0] == tok.token_to_id("<|begin_of_text|>")


def test_eos_ids_include_generation_config_and_glm_tokens(tmp_path):
    from eval_fixtures import make_tokenizer

    from glm_cli.core.infer.generation import eos_ids_for
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    old_config = SimpleNamespace(eos_token_id=2)  # before ModelConfig had eos_token_ids
    new_config = SimpleNamespace(eos_token_id=2, eos_token_ids=(2, 11))
    assert eos_ids_for(old_config, None, tmp_path) == [2, 7, 9]
    assert eos_ids_for(new_config, None, tmp_path) == [2, 7, 9, 11]
    assert eos_ids_for(new_config) == [2, 11]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 13}))
    assert eos_ids_for(old_config, None, tmp_path) == [2, 13]
    tok = make_tokenizer(tmp_path / "glm")
    assert eos_ids_for(SimpleNamespace(eos_token_id=None), load_tokenizer(tmp_path / "glm")) == [0, 5]
    assert tok.token_to_id("<|end|>") == 5
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        eos_ids_for(old_config, None, tmp_path)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def chatml_ckpt(tmp_path_factory):
    """A tiny random model saved with the ChatML tokenizer above, its end-of-turn in generation_config.json."""
    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer

    root = tmp_path_factory.mktemp("chatml")
    tok_dir = write_tokenizer_dir(root / "tok", TEMPLATES["chatml"])
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=384, n_layers=1, bos_token_id=None, eos_token_id=0,
                               pad_token_id=0))
    im_end = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    return save_checkpoint(root / "ckpt", model, tokenizer_dir=tok_dir, generation={"eos_token_id": [0, im_end]})


def test_generate_chat_with_the_models_template(chatml_ckpt):
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    code, out, error = invoke_glm("generate", chatml_ckpt, "--chat", "hi", "-n", "5", "--json")
    assert code == 0, error
    record = json.loads(out)
    encoder = chat_encoder_for(chatml_ckpt, load_tokenizer(chatml_ckpt))
    assert record["prompt_tokens"] == len(encoder.prompt_ids([{"role": "user", "content": "hi"}]))
    assert record["completion_tokens"] <= 5


def test_generate_prompts_with_an_unknown_role_name_the_line(chatml_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [Q1]}) + "\n"
                       + json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    code, _, error = invoke_glm("generate", chatml_ckpt, "--chat", "--prompts", prompts, "-n", "2")
    assert isinstance(error, DataError) and (error.source, error.line) == (str(prompts), 2)


def test_finetune_and_eval_pick_the_models_template(chatml_ckpt):
    from glm_cli.core.eval.tasks import Scorer, Task, evaluate_gen
    from glm_cli.core.load.tuning_base import load_tuning_base

    base = load_tuning_base(chatml_ckpt)
    tokenizer, encoder = base.tokenizer, base.encoder
    assert isinstance(encoder, TemplateChatEncoder) and encoder.end_id == tokenizer.token_to_id("<|im_end|>")
    model = __import__("glm_cli.core.checkpoint.loader", fromlist=["load_model"]).load_model(chatml_ckpt)
    scorer = Scorer(model, tokenizer, batch_size=2, checkpoint_dir=str(chatml_ckpt))
    task = Task(name="t", type="gen", source="t", records=[{"prompt": "hi", "answers": ["Paris"]}])
    result = evaluate_gen(scorer, task, max_new_tokens=3, chat=True)
    assert result["n"] == 1
