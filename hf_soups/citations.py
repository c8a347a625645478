"""BibTeX entries of the papers hf_soups implements beyond the merge methods (whose entries live
with each method in :mod:`hf_soups.methods`): recorded in recipes and shown in model cards."""

SOUPS = """@inproceedings{wortsman2022soups,
  title = {Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time},
  author = {Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Morcos, Ari S. and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and Kornblith, Simon and Schmidt, Ludwig},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2022},
  note = {arXiv:2203.05482}
}"""

WISE_FT = """@inproceedings{wortsman2022robust,
  title = {Robust fine-tuning of zero-shot models},
  author = {Wortsman, Mitchell and Ilharco, Gabriel and Kim, Jong Wook and Li, Mike and Kornblith, Simon and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Hajishirzi, Hannaneh and Farhadi, Ali and Namkoong, Hongseok and Schmidt, Ludwig},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2022},
  note = {arXiv:2109.01903}
}"""

PAINT = """@inproceedings{ilharco2022patching,
  title = {Patching open-vocabulary models by interpolating weights},
  author = {Ilharco, Gabriel and Wortsman, Mitchell and Gadre, Samir Yitzhak and Song, Shuran and Hajishirzi, Hannaneh and Kornblith, Simon and Farhadi, Ali and Schmidt, Ludwig},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year = {2022},
  note = {arXiv:2208.05592}
}"""

SPARSE_SOUPS = """@inproceedings{zimmer2024sparse,
  title = {Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging},
  author = {Zimmer, Max and Spiegel, Christoph and Pokutta, Sebastian},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2024},
  note = {arXiv:2306.16788}
}"""
