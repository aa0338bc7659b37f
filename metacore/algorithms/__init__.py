"""Meta-learning algorithms on top of metacore.network.Model.

Optimization-based (all tasks of a meta-batch at once, theta (T, P)): MAML with its exact
second-order meta-gradient, first-order MAML, Meta-SGD, Reptile.
Metric-based (episode loss with a hand-written gradient over one flat parameter vector):
Prototypical Networks, Matching Networks (with Full Context Embeddings), Relation Networks,
convolutional Siamese nets.
"""
from metacore.algorithms.maml import (MetaGradient, adapt, adapt_and_score, fomaml_gradient,
                                      maml_gradient, meta_objective)
from metacore.algorithms.matching import MatchingNet
from metacore.algorithms.protonet import ProtoNet
from metacore.algorithms.relation import RelationNet
from metacore.algorithms.reptile import reptile_direction, reptile_direction_serial
from metacore.algorithms.siamese import PairSampler, SiameseNet, lake_accuracy

__all__ = ["MetaGradient", "adapt", "adapt_and_score", "fomaml_gradient", "maml_gradient",
           "meta_objective", "reptile_direction", "reptile_direction_serial", "MatchingNet",
           "ProtoNet", "RelationNet", "SiameseNet", "PairSampler", "lake_accuracy"]
