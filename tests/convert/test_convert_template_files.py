"""The repo root's data files (config.json, preprocessor_config.json: the template a conversion starts from and what
the Hub repo shows) say what the code owns, never a second version of it: the auto_map comes from the classes'
`register_for_auto_class` calls, `architectures` from the model class, `custom_pipelines` from the pipeline file, the
processor settings from the processor's table for the config's geometry."""

import json

from siglip_navit_tools import repo_code

ROOT = repo_code.REPO_ROOT


def read(name: str) -> dict:
    return json.loads((ROOT / name).read_text())


def test_config_json_agrees_with_the_code():
    config = read("config.json")
    assert config["auto_map"] == repo_code.config_auto_map()
    assert config["architectures"] == repo_code.architectures()
    assert config["custom_pipelines"] == repo_code.custom_pipelines()
    assert config["model_type"] == repo_code.configuration().SiglipNaViTConfig.model_type


def test_preprocessor_config_json_agrees_with_the_code():
    settings = read("preprocessor_config.json")
    config = repo_code.configuration().SiglipNaViTConfig.from_json_file(str(ROOT / "config.json"))
    processor = repo_code.image_processing().SiglipNaViTImageProcessor
    assert settings == {"auto_map": repo_code.processor_auto_map(), **processor.settings_for_model(config)}


def test_the_auto_map_is_read_off_the_registered_classes():
    modeling = repo_code.modeling()
    assert repo_code.auto_map(modeling.SiglipVisionModel) == {"AutoModel": "modeling_siglip_navit.SiglipVisionModel"}
    assert set(repo_code.config_auto_map()) == {"AutoConfig", "AutoModel"}
    unregistered = type("Unregistered", (), {})
    try:
        repo_code.auto_map(unregistered)
    except ValueError as err:
        assert "Unregistered is not registered" in str(err)
    else:
        raise AssertionError("an unregistered class must not get an auto_map entry")
