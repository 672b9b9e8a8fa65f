"""Publish a trained detector to the Hub (the `mirage-push` command): model repo with card, optional Gradio
Space; see mirage_hf/hub.py.

python push_to_hub.py --model_dir outputs/demo/model --repo_id user/name [--space_repo_id user/name-demo] --dry_run
"""

from mirage_hf.hub import main

if __name__ == "__main__":
    main()
