"""The Gradio Space as deployed (app, requirements, card, examples); the wheel ships it as `mirage_hf.space`."""
