"""SoupBuilder: uniform, greedy (the paper's loop) and learned soups on tiny models."""

import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.evaluation import Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.soup import SoupBuilder

CONFIG = ViTConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=8,
    patch_size=4,
    num_channels=1,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def file_state(folder):
    return load_file(str(folder / "model.safetensors"))


def save_state(folder, state):
    """Save a ViT whose on-disk tensors are ``state`` (keys as on disk)."""
    model = ViTForImageClassification.from_pretrained(None, config=CONFIG, state_dict=state)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A target model and ingredients at various distances from it (keys as on disk)."""
    root = tmp_path_factory.mktemp("pool")
    torch.manual_seed(0)
    ViTForImageClassification(CONFIG).save_pretrained(root / "target")
    target = file_state(root / "target")
    folders = []
    generator = torch.Generator().manual_seed(1)
    for i, scale in enumerate([0.05, 0.3, 0.06, 0.5, 0.07, 0.08]):
        state = {
            name: tensor + scale * torch.randn(tensor.shape, generator=generator)
            for name, tensor in target.items()
        }
        folders.append(save_state(root / f"ingredient{i}", state))
    return root, target, folders


def negative_distance_to(target_model):
    """A score with known structure: minus the L2 distance of the weights to a target."""
    reference = target_model.state_dict()

    def score(model):
        state = model.state_dict()
        return -float(sum(((state[k] - reference[k]) ** 2).sum() for k in reference) ** 0.5)

    return score


def paper_greedy(states, score):
    """The greedy soup loop of mlfoundations/model-soups, written out on plain state dicts."""
    individual = [score(state) for state in states]
    order = sorted(range(len(states)), key=lambda i: individual[i], reverse=True)
    soup = [order[0]]
    soup_params = {k: v.double() for k, v in states[order[0]].items()}
    best = individual[order[0]]
    for i in order[1:]:
        n = len(soup)
        candidate = {
            k: soup_params[k] * (n / (n + 1.0)) + states[i][k].double() * (1.0 / (n + 1))
            for k in soup_params
        }
        candidate_score = score(candidate)
        if candidate_score > best:
            soup.append(i)
            soup_params = candidate
            best = candidate_score
    return soup, best


def test_greedy_follows_the_papers_loop(pool):
    root, target, folders = pool
    target_model = ViTForImageClassification.from_pretrained(root / "target")
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    soup = builder.greedy(negative_distance_to(target_model))

    states = [file_state(f) for f in folders]

    def file_score(state):
        return -float(
            sum(((state[k].double() - target[k].double()) ** 2).sum() for k in target) ** 0.5
        )

    expected, expected_score = paper_greedy(states, file_score)
    assert [i.source for i in soup.ingredients] == [str(folders[i]) for i in expected]
    assert 1 < len(expected) < len(folders)  # the pool is built so that greedy must choose
    trace = soup.record.greedy_trace
    assert [t.ingredient for t in trace if t.kept] == [str(folders[i]) for i in expected]
    assert trace[0].ingredient == str(folders[expected[0]])
    final = [t.soup_score for t in trace if t.kept][-1]
    assert final == pytest.approx(expected_score, rel=1e-5)
    # the saved soup is the uniform average of the kept ingredients
    merged = soup.state_dict()
    for name in target:
        reference = sum(states[i][name].double() for i in expected) / len(expected)
        torch.testing.assert_close(merged[name].double(), reference, atol=1e-6, rtol=0)


def test_greedy_options(pool, caplog):
    root, target, folders = pool
    score = negative_distance_to(ViTForImageClassification.from_pretrained(root / "target"))
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    capped = builder.greedy(score, max_size=2)
    assert len(capped.ingredients) == 2
    assert any(t.reason == "max_size reached" for t in capped.record.greedy_trace)
    # a huge required gain keeps only the best model, and says so
    with caplog.at_level("WARNING"):
        only_best = builder.greedy(score, min_gain=1e9)
    assert len(only_best.ingredients) == 1
    assert "kept only the best ingredient" in caplog.text
    # minimising the negated score picks the worst model first
    worst_first = builder.greedy(lambda m: -score(m), maximize=False)
    assert worst_first.ingredients[0].source == capped.ingredients[0].source
    # ... and the acceptance rule minimises too: the same soup as maximising the score
    paper = builder.greedy(score)
    assert [i.source for i in worst_first.ingredients] == [i.source for i in paper.ingredients]
    assert 1 < len(paper.ingredients) < len(folders)


def test_greedy_strictness_decides_ties(pool):
    """A score that ties everywhere: the paper's strict rule keeps only the best (first) model,
    strict=False keeps every one, since each tie is accepted."""
    _, _, folders = pool
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    assert len(builder.greedy(lambda model: 1.0).ingredients) == 1
    assert len(builder.greedy(lambda model: 1.0, strict=False).ingredients) == len(folders)


def test_uniform_soup_save_and_load(pool, tmp_path):
    _, _, folders = pool
    soup = SoupBuilder.from_pretrained([str(f) for f in folders[:3]]).uniform()
    out = soup.save_pretrained(tmp_path / "soup", progress=False)
    loaded = ViTForImageClassification.from_pretrained(out)
    states = [file_state(f) for f in folders[:3]]
    merged = file_state(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), sum(s[name].double() for s in states) / 3)
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["soup"]["method"] == "uniform"
    assert [i["source"] for i in recipe["ingredients"]] == [str(f) for f in folders[:3]]
    in_memory = soup.to_model().state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(in_memory[name], tensor)


def test_from_pretrained_finds_a_sweep(pool, tmp_path):
    _, _, folders = pool
    for i, folder in enumerate(folders[:2]):
        sweep_member = tmp_path / f"run{i}"
        ViTForImageClassification.from_pretrained(folder).save_pretrained(sweep_member)
        (sweep_member / "ingredient.json").write_text(json.dumps({"step": 10 * i}))
    builder = SoupBuilder.from_pretrained(tmp_path)
    assert [i.path.name for i in builder.ingredients] == ["run0", "run1"]
    assert builder.ingredients[1].metadata == {"step": 10}


def _teacher_dataset(teacher, n, seed):
    """Images with labels sampled from the teacher's own predictive distribution."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    with torch.no_grad():
        probabilities = torch.softmax(teacher(pixel_values=images).logits, dim=-1)
    labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    return datasets.Dataset.from_dict(
        {"pixel_values": images.numpy(), "labels": labels.numpy()}
    ).with_format("torch")


def test_learned_soup_recovers_known_coefficients(tmp_path):
    """Labels drawn from the model at weights 0.3 A + 0.7 B: maximum likelihood is there."""
    torch.manual_seed(0)
    states = []
    for i in range(2):
        model = ViTForImageClassification(CONFIG)
        with torch.no_grad():  # sharp, informative predictions
            model.classifier.weight.mul_(20)
        model.save_pretrained(tmp_path / f"m{i}")
        states.append(file_state(tmp_path / f"m{i}"))
    teacher_state = {k: 0.3 * states[0][k] + 0.7 * states[1][k] for k in states[0]}
    teacher = ViTForImageClassification.from_pretrained(
        None, config=CONFIG, state_dict=teacher_state
    )
    data = _teacher_dataset(teacher.eval(), 2000, seed=0)
    builder = SoupBuilder.from_pretrained([str(tmp_path / "m0"), str(tmp_path / "m1")])
    soup = builder.learned(data, epochs=10, lr=0.1, batch_size=250, progress=False)
    assert soup.weights[0] == pytest.approx(0.3, abs=0.05)
    assert sum(soup.weights) == pytest.approx(1.0)
    assert soup.record.coefficients["losses"][-1] < soup.record.coefficients["losses"][0]


def test_learned_by_layer_soup_saves_and_loads(pool, tmp_path):
    _, _, folders = pool
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict(
        {"pixel_values": images.numpy(), "labels": np.arange(64) % 3}
    ).with_format("torch")
    builder = SoupBuilder.from_pretrained([str(f) for f in folders[:3]])
    soup = builder.learned(data, by_layer=True, epochs=2, batch_size=32, progress=False)
    weights = soup.tensor_weights
    assert weights and all(sum(w) == pytest.approx(1.0, abs=1e-5) for w in weights.values())
    out = soup.save_pretrained(tmp_path / "learned", progress=False)
    loaded = ViTForImageClassification.from_pretrained(out).state_dict()
    # reference: each in-memory tensor is its own weighted sum of the ingredients' tensors
    models = [ViTForImageClassification.from_pretrained(f).state_dict() for f in folders[:3]]
    for name, tensor_weights in weights.items():
        reference = sum(w * m[name].double() for w, m in zip(tensor_weights, models))
        torch.testing.assert_close(loaded[name].double(), reference, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "soup.json").read_text())["soup"]["method"] == "learned_by_layer"


def test_ensemble_and_report_with_an_evaluator(pool):
    _, _, folders = pool
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(50, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (50,), generator=generator)
    data = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()})
    evaluator = Evaluator(data, batch_size=16, name="held_out")
    builder = SoupBuilder.from_pretrained([str(f) for f in folders[:3]])
    result = builder.ensemble(evaluator)
    models = [ViTForImageClassification.from_pretrained(f).eval() for f in folders[:3]]
    with torch.no_grad():
        mean_logits = sum(m(pixel_values=images).logits for m in models) / 3
    expected = (mean_logits.argmax(-1) == labels).float().mean().item()
    assert result.score == pytest.approx(expected)
    soup = builder.greedy(evaluator)
    table = soup.report()
    for name in ["ensemble", "greedy soup", *(str(f) for f in folders[:3])]:
        assert name in table
    assert isinstance(Ingredient.from_source(folders[0]).name, str)


def test_check_warns_and_is_recorded_with_the_soup(tmp_path, caplog):
    torch.manual_seed(0)
    ViTForImageClassification(CONFIG).save_pretrained(tmp_path / "start")
    start = file_state(tmp_path / "start")
    generator = torch.Generator().manual_seed(1)
    sources = []
    for i in range(3):  # small moves from one start, as fine-tuning makes
        moved = {k: t + 0.002 * torch.randn(t.shape, generator=generator) for k, t in start.items()}
        sources.append(str(save_state(tmp_path / f"fine_tune{i}", moved)))
    torch.manual_seed(123)  # an unrelated model: another random start
    ViTForImageClassification(CONFIG).save_pretrained(tmp_path / "stranger")
    sources.append(str(tmp_path / "stranger"))
    builder = SoupBuilder.from_pretrained(sources)
    with caplog.at_level("WARNING"):
        report = builder.check()
    assert [v.ingredient for v in report.verdicts if v.status == "fail"] == [sources[-1]]
    assert "stranger" in caplog.text
    out = builder.uniform().save_pretrained(tmp_path / "soup", progress=False)
    recipe = json.loads((out / "soup.json").read_text())
    assert recipe["diagnostics"]["ok"] is False
    assert recipe["plots"] and all((out / name).is_file() for name in recipe["plots"])
    assert len(builder.uniform().ingredients) == 4  # warned about, never dropped
