"""compel's own parser tests as facts: every case of compel's tests/test_prompt_parser.py (damian0815/compel,
commit c60b9fb) with the structure compel's test expects, checked against sdtune's compel parser.

Inputs and expected structures were transcribed from compel's test assertions (its expected objects, with the
escaping its `Fragment` applies to them: `Fragment('\\(man\\)')` is the text `(man)`), into sdtune's notation
below: a prompt is a list of (text, weight) and swap(...) items; `conj(prompts, weights, loras)`,
`blend(prompts, weights, normalize)`. Swap options are compel's defaults {s_start 0, s_end 0, t_start 0.2, t_end 1}
merged with the ones written. Weights are compared with ==, as compel's tests do.
"""

from __future__ import annotations

import math

import pytest

from sdtune.errors import SdtuneError
from sdtune.prompts import (
    Blend,
    Fragment,
    detect_syntax,
    extract_extra_networks,
    parse_prompt,
)
from sdtune.prompts.compel import compel_structure, parse_compel, parse_compel_weights
from sdtune.prompts.compel_nodes import (
    SWAP_DEFAULTS,
    CBlend,
    CConjunction,
    CFragment,
    CSwap,
)
from sdtune.prompts.extra_networks import ExtraNetwork


def _prompt(items: list) -> tuple:
    return tuple(x if isinstance(x, CSwap) else CFragment(x[0], x[1]) for x in items)


def swap(original: list, edited: list, options: dict | None = None) -> CSwap:
    return CSwap(_prompt(original), _prompt(edited), {**SWAP_DEFAULTS, **(options or {})})


def blend(prompts: list, weights: list, normalize: bool = True) -> CBlend:
    return CBlend(tuple(_prompt(p) for p in prompts), tuple(weights), normalize)


def conj(prompts: list, weights: list | None = None, loras: list | None = None) -> CConjunction:
    parts = tuple(p if isinstance(p, CBlend) else _prompt(p) for p in prompts)
    return CConjunction(parts, tuple(weights or [1.0] * len(parts)), tuple(loras or ()))


# (compel test, input, fragments): one prompt of plain weighted fragments
PLAIN = [
    ('attention', '(flames)0.5', [('flames', 0.5)]),
    ('attention', '(flames).attend(0.5)', [('flames', 0.5)]),
    ('attention', 'flames.attend(0.5)', [('flames', 0.5)]),
    ('attention', '"flames".attend(0.5)', [('flames', 0.5)]),
    ('attention', '(fire flames)0.5', [('fire flames', 0.5)]),
    ('attention', '(fire flames).attend(0.5)', [('fire flames', 0.5)]),
    ('attention', '(flames)+', [('flames', 1.1)]),
    ('attention', 'flames+', [('flames', 1.1)]),
    ('attention', '"flames"+', [('flames', 1.1)]),
    ('attention', 'flames.attend(+)', [('flames', 1.1)]),
    ('attention', '(flames).attend(+)', [('flames', 1.1)]),
    ('attention', '"flames".attend(+)', [('flames', 1.1)]),
    ('attention', '(flames)-', [('flames', 0.9)]),
    ('attention', 'flames-', [('flames', 0.9)]),
    ('attention', '"flames"-', [('flames', 0.9)]),
    ('attention', 'fire (flames)0.5', [('fire', 1.0), ('flames', 0.5)]),
    ('attention', 'fire flames.attend(0.5)', [('fire', 1.0), ('flames', 0.5)]),
    ('attention', 'fire (flames).attend(0.5)', [('fire', 1.0), ('flames', 0.5)]),
    ('attention', 'fire "flames".attend(0.5)', [('fire', 1.0), ('flames', 0.5)]),
    ('attention', '(flames)++', [('flames', 1.2100000000000002)]),
    ('attention', '(flames)--', [('flames', 0.81)]),
    ('attention', '(flowers)--- flames+++', [('flowers', 0.7290000000000001), ('flames', 1.3310000000000004)]),
    ('attention', '(pretty flowers)+', [('pretty flowers', 1.1)]),
    ('attention', '(pretty flowers)+, the flames are too hot', [('pretty flowers', 1.1),
     (', the flames are too hot', 1.0)]),
    ('bad_auto1111_syntax', '(happy camper:0.3)', [('happy camper:0 . 3', 1.0)]),
    ('badly_formed', 'a test prompt', [('a test prompt', 1.0)]),
    ('badly_formed', 'a badly formed +test prompt', [('a badly formed +test prompt', 1.0)]),
    ('badly_formed', 'a badly (formed test prompt', [('a badly (formed test prompt', 1.0)]),
    ('badly_formed', 'a badly (formed +test prompt', [('a badly (formed +test prompt', 1.0)]),
    ('badly_formed', 'a badly (formed +test )prompt', [('a badly formed +test prompt', 1.0)]),
    ('badly_formed', '(((a badly (formed +test )prompt', [('(((a badly formed +test prompt', 1.0)]),
    ('badly_formed', '(a (ba)dly (f)ormed +test prompt', [('(a ba dly f ormed +test prompt', 1.0)]),
    ('badly_formed', '(a (ba)dly (f)ormed +test +prompt', [('(a ba dly f ormed +test +prompt', 1.0)]),
    ('badly_formed', 'hamburger ((bun))', [('hamburger bun', 1.0)]),
    ('badly_formed', 'hamburger (bun)', [('hamburger bun', 1.0)]),
    ('badly_formed', 'hamburger (kaiser roll)', [('hamburger kaiser roll', 1.0)]),
    ('badly_formed', 'hamburger ((kaiser roll))', [('hamburger kaiser roll', 1.0)]),
    ('basic', 'fire flames', [('fire flames', 1.0)]),
    ('basic', 'fire (flames)', [('fire flames', 1.0)]),
    ('basic', 'fire, flames', [('fire, flames', 1.0)]),
    ('basic', 'fire, flames , fire', [('fire, flames , fire', 1.0)]),
    ('basic', 'cat hot-dog eating', [('cat hot-dog eating', 1.0)]),
    ('basic', 'Dalí', [('Dalí', 1.0)]),
    ('commas_and_whitespace', 'middle age,fantasy++ style', [('middle age,', 1.0), ('fantasy', 1.2100000000000002),
     ('style', 1.0)]),
    ('empty', '', [('', 1.0)]),
    ('escaping', 'mountain \\(man\\)', [('mountain (man)', 1.0)]),
    ('escaping', 'mountain (\\(man)\\)', [('mountain (man )', 1.0)]),
    ('escaping', 'mountain (\\(man\\))', [('mountain (man)', 1.0)]),
    ('escaping', 'mountain (\\(man\\))+', [('mountain', 1.0), ('(man)', 1.1)]),
    ('escaping', '"mountain" (\\(man\\))+', [('mountain', 1.0), ('(man)', 1.1)]),
    ('escaping', '\\"mountain\\" (\\(man\\))+', [('"mountain"', 1.0), ('(man)', 1.1)]),
    ('escaping', '(\\"mountain\\")+ (\\(man\\))+', [('"mountain" (man)', 1.1)]),
    ('escaping', '(\\"mountain\\")+ (\\(man\\))-', [('"mountain"', 1.1), ('(man)', 0.9)]),
    ('escaping', 'mountain (\\(man\\))1.1', [('mountain', 1.0), ('(man)', 1.1)]),
    ('escaping', '"mountain" (\\(man\\))1.1', [('mountain', 1.0), ('(man)', 1.1)]),
    ('escaping', '\\"mountain\\" (\\(man\\))1.1', [('"mountain"', 1.0), ('(man)', 1.1)]),
    ('escaping', '(\\"mountain\\")+ (\\(man\\))1.1', [('"mountain" (man)', 1.1)]),
    ('escaping', '(\\"mountain\\")1.1 (\\(man\\))0.9', [('"mountain"', 1.1), ('(man)', 0.9)]),
    ('escaping', 'hairy (mountain (\\(man\\))+)+', [('hairy', 1.0), ('mountain', 1.1), ('(man)', 1.2100000000000002)]),
    ('escaping', 'hairy ((\\(man\\))1.1 "mountain")+', [('hairy', 1.0), ('(man)', 1.2100000000000002),
     ('mountain', 1.1)]),
    ('escaping', 'hairy ("mountain" (\\(man\\))1.1 )+', [('hairy', 1.0), ('mountain', 1.1),
     ('(man)', 1.2100000000000002)]),
    ('escaping', 'hairy ("mountain, man")+', [('hairy', 1.0), ('mountain , man', 1.1)]),
    ('escaping', 'hairy ("mountain, man" with a beard+)+', [('hairy', 1.0), ('mountain , man with a', 1.1),
     ('beard', 1.2100000000000002)]),
    ('escaping', 'hairy ("mountain, man" with a (beard)2.0)+', [('hairy', 1.0), ('mountain , man with a', 1.1),
     ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man\\"" with a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man" with a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, m\\"an\\"" with a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , m"an" with a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" \\(with a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man (with a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" w\\(ith a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man w(ith a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" with\\( a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man with( a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" \\)with a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man )with a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" w\\)ith a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man w)ith a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mountain, \\"man" with\\) a (beard)2.0)+', [('hairy', 1.0),
     ('mountain , "man with) a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy ("mou\\)ntain, \\"man" \\(wit\\(h a (beard)2.0)+', [('hairy', 1.0),
     ('mou)ntain , "man (wit(h a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hai\\(ry ("mountain, \\"man" w\\)ith a (beard)2.0)+', [('hai(ry', 1.0),
     ('mountain , "man w)ith a', 1.1), ('beard', 2.2)]),
    ('escaping', 'hairy\\(\\( ("mountain, \\"man" with a (beard)2.0)+', [('hairy((', 1.0),
     ('mountain , "man with a', 1.1), ('beard', 2.2)]),
    ('escaping', '("mountain, \\"man" \\(with a (beard)2.0)+ hairy', [('mountain , "man (with a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mountain, \\"man" w\\(ith a (beard)2.0)+hairy', [('mountain , "man w(ith a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mountain, \\"man" with\\( a (beard)2.0)+ hairy', [('mountain , "man with( a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mountain, \\"man" \\)with a (beard)2.0)+ hairy', [('mountain , "man )with a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mountain, \\"man" w\\)ith a (beard)2.0)+ hairy', [('mountain , "man w)ith a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', ' ("mountain, \\"man" with\\) a (beard)2.0)+ hairy', [('mountain , "man with) a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mou\\)ntain, \\"man" \\(wit\\(h a (beard)2.0)+ hairy', [('mou)ntain , "man (wit(h a', 1.1),
     ('beard', 2.2), ('hairy', 1.0)]),
    ('escaping', '("mountain, \\"man" w\\)ith a (beard)2.0)+ hai\\(ry ', [('mountain , "man w)ith a', 1.1),
     ('beard', 2.2), ('hai(ry', 1.0)]),
    ('escaping', '("mountain, \\"man" with a (beard)2.0)+ hairy\\(\\( ', [('mountain , "man with a', 1.1),
     ('beard', 2.2), ('hairy((', 1.0)]),
    ('nested', 'fire (flames (trees)1.5)2.0', [('fire', 1.0), ('flames', 2.0), ('trees', 3.0)]),
    ('no_parens_attention_runon', 'fire flames++', [('fire', 1.0), ('flames', 1.2100000000000002)]),
    ('no_parens_attention_runon', 'fire flames--', [('fire', 1.0), ('flames', 0.81)]),
    ('no_parens_attention_runon', 'flowers fire++ flames', [('flowers', 1.0), ('fire', 1.2100000000000002),
     ('flames', 1.0)]),
    ('no_parens_attention_runon', 'flowers fire-- flames', [('flowers', 1.0), ('fire', 0.81), ('flames', 1.0)]),
    ('numbers_to_floats', '(test1, 1test, test1test)', [('test1 , 1test , test1test', 1.0)]),
    ('wayward_periods', '(a text.)0.7. (a second text.)0.8', [('a text .', 0.7), ('.', 1.0), ('a second text .', 0.8)]),
    ('wayward_periods', '"a text."0.7. "a second text."0.8', [('a text .', 0.7), ('.', 1.0), ('a second text .', 0.8)]),
]

# (compel test, input, structure): blends, conjunctions, swaps, LoRAs
STRUCTURED = [
    ('badly_formed', '("((a badly (formed +test ").blend(1.0)',
     conj([blend([[('((a badly (formed +test', 1.0)]], [1.0])])),
    ('blend', '("mountain", "man").blend()', conj([blend([[('mountain', 1.0)], [('man', 1.0)]], [1.0, 1.0])])),
    ('blend', '(mountain, man).blend()', conj([blend([[('mountain', 1.0)], [('man', 1.0)]], [1.0, 1.0])])),
    ('blend', '((mountain), (man)).blend()', conj([blend([[('mountain', 1.0)], [('man', 1.0)]], [1.0, 1.0])])),
    ('blend', '((mountain), (tall man)).blend()', conj([blend([[('mountain', 1.0)],
     [('tall man', 1.0)]], [1.0, 1.0])])),
    ('blend', '("fire", "fire flames").blend(0.7, 0.3)', conj([blend([[('fire', 1.0)],
     [('fire flames', 1.0)]], [0.7, 0.3])])),
    ('blend', '("fire", "fire flames", "hi").blend(0.7, 0.3, 1.0)', conj([blend([[('fire', 1.0)],
     [('fire flames', 1.0)], [('hi', 1.0)]], [0.7, 0.3, 1.0])])),
    ('blend', '("fire", "fire flames (hot)++", "hi").blend(0.7, 0.3, 1.0)', conj([blend([[('fire', 1.0)],
     [('fire flames', 1.0), ('hot', 1.2100000000000002)], [('hi', 1.0)]], [0.7, 0.3, 1.0])])),
    ('blend', '("fire").blend(0.7)', conj([blend([[('fire', 1.0)]], [0.7])])),
    ('blend', '("fire", "").blend(0.7, 1)', conj([blend([[('fire', 1.0)], [('', 1.0)]], [0.7, 1.0])])),
    ('blend', '("fire", " ").blend(0.7, 1)', conj([blend([[('fire', 1.0)], [('', 1.0)]], [0.7, 1.0])])),
    ('blend', '("fire", "     ").blend(0.7, 1)', conj([blend([[('fire', 1.0)], [('', 1.0)]], [0.7, 1.0])])),
    ('blend', '("fire", "  ,  ").blend(0.7, 1)', conj([blend([[('fire', 1.0)], [(',', 1.0)]], [0.7, 1.0])])),
    ('blend', '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1)',
     conj([blend([[('mountain , man , hairy', 1.0)], [('face , teeth ,', 1.0), ('eyes', 0.81)]], [1.0, -1.0])])),
    ('blend', '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1,no_normalize)',
     conj([blend([[('mountain , man , hairy', 1.0)], [('face , teeth ,', 1.0),
     ('eyes', 0.81)]], [1.0, -1.0], normalize=False)])),
    ('blend_and_lora', '("mountain", "man").blend() withLora(hairy, 0.5)', conj([blend([[('mountain', 1.0)],
     [('man', 1.0)]], [1.0, 1.0])], loras=[('hairy', 0.5)])),
    ('blend_and_lora', '("mountain withLora(hairy, 0.5)", "man").blend()', conj([blend([[('mountain', 1.0)],
     [('man', 1.0)]], [1.0, 1.0])], loras=[('hairy', 0.5)])),
    ('blend_and_lora', '("mountain", "man withLora(hairy, 0.5)").blend()', conj([blend([[('mountain', 1.0)],
     [('man', 1.0)]], [1.0, 1.0])], loras=[('hairy', 0.5)])),
    ('complex_conjunction', '("mountain man", "a person with a hat (riding a bicycle)++").and(0.5, 0.5)',
     conj([[('mountain man', 1.0)], [('a person with a hat', 1.0),
     ('riding a bicycle', 1.2100000000000002)]], weights=[0.5, 0.5])),
    ('complex_conjunction', '("mountain man", "a person with a hat (riding a bicycle.swap(skateboard))++").and(0.5, 0.5)',
     conj([[('mountain man', 1.0)], [('a person with a hat', 1.0), ('riding a', 1.2100000000000002),
     swap([('bicycle', 1.2100000000000002)], [('skateboard', 1.2100000000000002)])]], weights=[0.5, 0.5])),
    ('conjunction_weights', '("fire", "flames").and(2,1)', conj([[('fire', 1.0)],
     [('flames', 1.0)]], weights=[2.0, 1.0])),
    ('conjunction_weights', '("fire", "flames").and(1,2)', conj([[('fire', 1.0)],
     [('flames', 1.0)]], weights=[1.0, 2.0])),
    ('cross_attention_control', 'sun.swap(moon)', conj([[swap([('sun', 1.0)], [('moon', 1.0)])]])),
    ('cross_attention_control', 'a "cat".swap(dog) eating a hotdog', conj([[('a', 1.0), swap([('cat', 1.0)],
     [('dog', 1.0)]), ('eating a hotdog', 1.0)]])),
    ('cross_attention_control', 'a cat.swap(dog) eating a hotdog', conj([[('a', 1.0), swap([('cat', 1.0)],
     [('dog', 1.0)]), ('eating a hotdog', 1.0)]])),
    ('cross_attention_control', 'fire "flames".swap(trees)', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire (flames).swap(trees)', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire ("flames").swap(trees)', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire "flames".swap("trees")', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire (flames).swap("trees")', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire ("flames").swap("trees")', conj([[('fire', 1.0), swap([('flames', 1.0)],
     [('trees', 1.0)])]])),
    ('cross_attention_control', 'fire ("flames").swap("trees and houses")', conj([[('fire', 1.0),
     swap([('flames', 1.0)], [('trees and houses', 1.0)])]])),
    ('cross_attention_control', 'fire (flames).swap("trees and houses")', conj([[('fire', 1.0),
     swap([('flames', 1.0)], [('trees and houses', 1.0)])]])),
    ('cross_attention_control', 'fire "flames".swap("trees and houses")', conj([[('fire', 1.0),
     swap([('flames', 1.0)], [('trees and houses', 1.0)])]])),
    ('cross_attention_control', 'fire ("trees and houses").swap("flames")', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', 'fire (trees and houses).swap("flames")', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', 'fire "trees and houses".swap("flames")', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', 'fire ("trees and houses").swap(flames)', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', 'fire (trees and houses).swap(flames)', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', 'fire "trees and houses".swap(flames)', conj([[('fire', 1.0),
     swap([('trees and houses', 1.0)], [('flames', 1.0)])]])),
    ('cross_attention_control', '"flames".swap("trees"), fire', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', '(flames).swap("trees"), fire', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', '("flames").swap("trees"), fire', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', '"flames".swap(trees), fire', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', '(flames).swap(trees), fire ', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', '("flames").swap(trees), fire ', conj([[swap([('flames', 1.0)], [('trees', 1.0)]),
     (', fire', 1.0)]])),
    ('cross_attention_control', 'a forest landscape "".swap("in winter")', conj([[('a forest landscape', 1.0),
     swap([('', 1.0)], [('in winter', 1.0)])]])),
    ('cross_attention_control', 'a forest landscape ().swap(in winter)', conj([[('a forest landscape', 1.0),
     swap([('', 1.0)], [('in winter', 1.0)])]])),
    ('cross_attention_control', 'a forest landscape " ".swap("in winter")', conj([[('a forest landscape', 1.0),
     swap([('', 1.0)], [('in winter', 1.0)])]])),
    ('cross_attention_control', 'a forest landscape "in winter".swap("")', conj([[('a forest landscape', 1.0),
     swap([('in winter', 1.0)], [('', 1.0)])]])),
    ('cross_attention_control', 'a forest landscape "in winter".swap()', conj([[('a forest landscape', 1.0),
     swap([('in winter', 1.0)], [('', 1.0)])]])),
    ('cross_attention_control', 'a forest landscape "in winter".swap(" ")', conj([[('a forest landscape', 1.0),
     swap([('in winter', 1.0)], [('', 1.0)])]])),
    ('cross_attention_control_options', 'a "cat".swap(dog, s_start=0.1) eating a hotdog', conj([[('a', 1.0),
     swap([('cat', 1.0)], [('dog', 1.0)], {'s_start': 0.1}), ('eating a hotdog', 1.0)]])),
    ('cross_attention_control_options', 'a "cat".swap(dog, t_start=0.1) eating a hotdog', conj([[('a', 1.0),
     swap([('cat', 1.0)], [('dog', 1.0)], {'t_start': 0.1}), ('eating a hotdog', 1.0)]])),
    ('cross_attention_control_options', 'a "cat".swap(dog, t_start=0.1, s_start=20) eating a hotdog',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)], {'s_start': 20.0, 't_start': 0.1}),
     ('eating a hotdog', 1.0)]])),
    ('cross_attention_control_options', 'a fantasy forest landscape "".swap(with a river, s_start=0.8, t_start=0.8)',
     conj([[('a fantasy forest landscape', 1.0), swap([('', 1.0)],
     [('with a river', 1.0)], {'s_start': 0.8, 't_start': 0.8})]])),
    ('cross_attention_control_with_attention', '"(flames)0.5".swap("(trees)0.7"), (fire)2.0',
     conj([[swap([('flames', 0.5)], [('trees', 0.7)]), (',', 1.0), ('fire', 2.0)]])),
    ('cross_attention_control_with_attention', '"(fire (flames)0.5)0.5".swap("(trees)0.7"), (fire)2.0',
     conj([[swap([('fire', 0.5), ('flames', 0.25)], [('trees', 0.7)]), (',', 1.0), ('fire', 2.0)]])),
    ('cross_attention_control_with_attention', '"(fire (flames)0.5)0.5".swap("(trees)0.7 houses"), (fire)2.0',
     conj([[swap([('fire', 0.5), ('flames', 0.25)], [('trees', 0.7), ('houses', 1.0)]), (',', 1.0), ('fire', 2.0)]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap(hotdog++++)', conj([[('a', 1.0),
     swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('hotdog', 1.4641000000000004)])]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap(hotdog++++, shape_freedom=0.5)',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('hotdog', 1.4641000000000004)], {'s_end': 0.2062994740159002})]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap("hotdog++++", shape_freedom=0.5)',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('hotdog', 1.4641000000000004)], {'s_end': 0.2062994740159002})]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap(h\\(o\\)tdog++++, shape_freedom=0.5)',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('h(o)tdog', 1.4641000000000004)], {'s_end': 0.2062994740159002})]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap("h\\(o\\)tdog++++", shape_freedom=0.5)',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('h(o)tdog', 1.4641000000000004)], {'s_end': 0.2062994740159002})]])),
    ('cross_attention_control_with_attention', 'a cat.swap(dog) eating a hotdog.swap(h\\(o\\)tdog-, shape_freedom=0.5)',
     conj([[('a', 1.0), swap([('cat', 1.0)], [('dog', 1.0)]), ('eating a', 1.0), swap([('hotdog', 1.0)],
     [('h(o)tdog', 0.9)], {'s_end': 0.2062994740159002})]])),
    ('cross_attention_escaping', 'mountain (man).swap(monkey)', conj([[('mountain', 1.0), swap([('man', 1.0)],
     [('monkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (man).swap(m\\(onkey)', conj([[('mountain', 1.0), swap([('man', 1.0)],
     [('m(onkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (m\\(an).swap(m\\(onkey)', conj([[('mountain', 1.0), swap([('m(an', 1.0)],
     [('m(onkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (\\(\\(\\().swap(m\\(on\\)\\)key)', conj([[('mountain', 1.0),
     swap([('(((', 1.0)], [('m(on))key', 1.0)])]])),
    ('cross_attention_escaping', 'mountain ("man").swap(monkey)', conj([[('mountain', 1.0), swap([('man', 1.0)],
     [('monkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain ("man").swap("monkey")', conj([[('mountain', 1.0), swap([('man', 1.0)],
     [('monkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (\\"man).swap("monkey")', conj([[('mountain', 1.0), swap([('"man', 1.0)],
     [('monkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (man).swap(m\\(onkey)', conj([[('mountain', 1.0), swap([('man', 1.0)],
     [('m(onkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (m\\(an).swap(m\\(onkey)', conj([[('mountain', 1.0), swap([('m(an', 1.0)],
     [('m(onkey', 1.0)])]])),
    ('cross_attention_escaping', 'mountain (\\(\\(\\().swap(m\\(on\\)\\)key)', conj([[('mountain', 1.0),
     swap([('(((', 1.0)], [('m(on))key', 1.0)])]])),
    ('explicit_conjunction', '("fire", "flames").and(1,1)', conj([[('fire', 1.0)], [('flames', 1.0)]])),
    ('explicit_conjunction', '("fire", "flames").and()', conj([[('fire', 1.0)], [('flames', 1.0)]])),
    ('explicit_conjunction', '("fire flames", "mountain man").and()', conj([[('fire flames', 1.0)],
     [('mountain man', 1.0)]])),
    ('explicit_conjunction', '("(fire)2.0", "flames-").and()', conj([[('fire', 2.0)], [('flames', 0.9)]])),
    ('explicit_conjunction', '("fire", "flames", "mountain man").and()', conj([[('fire', 1.0)], [('flames', 1.0)],
     [('mountain man', 1.0)]])),
    ('lora', 'mountain man withLora(hairy)', conj([[('mountain man', 1.0)]], loras=[('hairy', 1.0)])),
    ('lora', 'mountain man useLora(hairy)', conj([[('mountain man', 1.0)]], loras=[('hairy', 1.0)])),
    ('lora', 'mountain man withLora(hairy, 0.5)', conj([[('mountain man', 1.0)]], loras=[('hairy', 0.5)])),
    ('lora', 'withLora(hairy, 0.5) mountain man', conj([[('mountain man', 1.0)]], loras=[('hairy', 0.5)])),
    ('lora', 'mountain withLora(hairy, 0.5) man', conj([[('mountain man', 1.0)]], loras=[('hairy', 0.5)])),
    ('lora', 'mountain withLora(hairy, 0.5) man withLora(ugly, 0.2)',
     conj([[('mountain man', 1.0)]], loras=[('hairy', 0.5), ('ugly', 0.2)])),
    ('nested', '("fire (flames)++", "mountain (man)2").blend(1,1)', conj([blend([[('fire', 1.0),
     ('flames', 1.2100000000000002)], [('mountain', 1.0), ('man', 2.0)]], [1.0, 1.0])])),
    ('single', '("mountain man", "a person with a hat (riding a bicycle.swap(skateboard))++").and(0.5, 0.5)',
     conj([[('mountain man', 1.0)], [('a person with a hat', 1.0), ('riding a', 1.2100000000000002),
     swap([('bicycle', 1.2100000000000002)], [('skateboard', 1.2100000000000002)])]], weights=[0.5, 0.5])),
]

# (compel test, input): compel raises a ParsingException; sdtune a one-line SdtuneError
ERRORS = [
    ('blend', '((mountain), "cat.swap(dog)").blend()'),
    ('blend', '("fire", "fire flames").blend(0.7, 0.3, 0.1)'),
    ('blend', '("fire", "fire flames").blend(0.7)'),
    ('conjunction_weights', '("fire", "flames").and(2)'),
    ('conjunction_weights', '("fire", "flames").and(2,1,2)'),
]

# (compel test, input, structure the result must NOT equal): the LoRA is not dropped
NOT_EQUAL = [
    ('lora', 'mountain man withLora(hairy, 0.5)', conj([[('mountain man', 1.0)]])),
    ('lora', 'mountain man useLora(hairy, 0.5)', conj([[('mountain man', 1.0)]])),
]


def _kind(structure: CConjunction) -> str:
    parts = structure.prompts
    if any(isinstance(p, CBlend) for p in parts):
        return "blend"
    if any(isinstance(x, CSwap) for p in parts for x in p):
        return "swap"
    if structure.loras:
        return "lora"
    return "conjunction"


def test_the_table_is_compels_whole_test_file():
    assert len(PLAIN) + len(STRUCTURED) + len(ERRORS) + len(NOT_EQUAL) == 187
    counts: dict[str, int] = {}
    for _, _, expected in STRUCTURED:
        counts[_kind(expected)] = counts.get(_kind(expected), 0) + 1
    assert (len(PLAIN), counts) == (92, {"blend": 19, "conjunction": 8, "swap": 55, "lora": 6})


@pytest.mark.parametrize("name,text,fragments", PLAIN)
def test_plain_case_parses_as_compel(name, text, fragments):
    assert compel_structure(text) == conj([fragments])
    assert parse_compel_weights(text) == [[t, w] for t, w in fragments]
    cond = parse_compel(text)  # the encoder's input: the same texts and weights (all within [0, 100] here)
    assert [(f.text, f.weight) for f in cond] == [(t, w) for t, w in fragments if t.strip()] or cond == (Fragment(""),)


@pytest.mark.parametrize("name,text,expected", STRUCTURED)
def test_structured_case_parses_as_compel(name, text, expected):
    assert compel_structure(text) == expected
    if _kind(expected) == "swap":
        with pytest.raises(SdtuneError, match=r"\.swap\(\) .*not supported; use A1111 prompt editing \[from:to:when\]") as e:
            parse_compel(text)
        assert "\n" not in str(e.value)
    else:
        parse_compel(text)


@pytest.mark.parametrize("name,text", ERRORS)
def test_compel_errors_are_one_line_sdtune_errors(name, text):
    with pytest.raises(SdtuneError) as e:
        compel_structure(text)
    assert "\n" not in str(e.value)
    with pytest.raises(SdtuneError):
        parse_prompt(text, syntax="auto")


@pytest.mark.parametrize("name,text,not_expected", NOT_EQUAL)
def test_lora_is_not_dropped(name, text, not_expected):
    assert compel_structure(text) != not_expected


# -- beyond compel's own tests: how sdtune uses the structure ---------------------------------------------------------

@pytest.mark.parametrize("text", ["a" + "+" * 7448, "(a)" + "+" * 7448, '"a"' + "+" * 20000])
def test_thousands_of_plus_signs_give_a_bounded_weight(text):
    """compel raises OverflowError (1.1 ** 7448); sdtune's raw weight is inf and the encoder gets 100."""
    assert parse_compel_weights(text) == [["a", math.inf]]
    assert parse_compel(text) == (Fragment("a", 100.0),)
    assert parse_prompt(text).parts[0].schedule[0].cond == (Fragment("a", 100.0),)


@pytest.mark.parametrize("text", ["sun.swap(moon)", "a (cat).swap(dog, s_start=0.1)", 'a "cat".swap("dog")',
                                  "a cat.swap(dog"])
def test_swap_is_refused_in_one_line_never_read_as_text(text):
    assert detect_syntax(text) == "compel"
    for syntax in ("auto", "compel"):
        with pytest.raises(SdtuneError, match=r"use A1111 prompt editing \[from:to:when\]") as e:
            parse_prompt(text, syntax=syntax)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,name,weight,rest", [
    ("mountain man withLora(hairy, 0.5)", "hairy", 0.5, "mountain man "),
    ("useLora(hairy) mountain man", "hairy", 1.0, " mountain man"),
    ("a (cat withLora(styles/ink.v2, -1))1.2", "styles/ink.v2", -1.0, "a (cat )1.2"),
    ("a withLora( hairy , .5 ) b", "hairy", 0.5, "a  b"),
])
def test_with_lora_becomes_the_same_extra_network_as_a_lora_tag(text, name, weight, rest):
    assert extract_extra_networks(text) == (rest, [ExtraNetwork("lora", name, weight)])
    assert extract_extra_networks(f"x <lora:{name}:{weight}>")[1] == [ExtraNetwork("lora", name, weight)]
    for syntax in ("auto", "compel", "a1111"):
        assert parse_prompt(text, syntax=syntax).networks == (ExtraNetwork("lora", name, weight),)


def test_lora_calls_and_tags_keep_prompt_order():
    text, nets = extract_extra_networks("a <lora:x:0.3> b withLora(y, 0.2) c <hypernet:z> xwithLora(q)")
    assert [n.name for n in nets] == ["x", "y", "z"]  # `xwithLora(` does not start a word: text, as in compel
    assert text == "a  b  c  xwithLora(q)"


def test_generator_loads_with_lora_exactly_like_the_tag():
    """The LoRA extra network reads the prompt's tags through extract_extra_networks: both spellings give the same
    (name, weight) to it."""
    from sdtune.adapters.lora.tags import LORA_TAGS
    from sdtune.adapters.tags import prompt_tags

    assert prompt_tags(LORA_TAGS, "a cat withLora(ink, 0.5)") == prompt_tags(LORA_TAGS, "a cat <lora:ink:0.5>")
    assert prompt_tags(LORA_TAGS, "a cat useLora(ink)") == prompt_tags(LORA_TAGS, "a cat <lora:ink>")


@pytest.mark.parametrize("text", ["a withLora(my lora, 0.5)", "a useLora(x, abc)", "a withLora()"])
def test_malformed_lora_call_is_a_one_line_error(text):
    assert detect_syntax(text) == "compel"
    with pytest.raises(SdtuneError, match=r"withLora\(name, weight\)"):
        parse_prompt(text)


def test_and_maps_to_chunks_with_weighted_tokens():
    """compel encodes each .and() prompt on its own, moves it from the empty prompt's encoding e by its weight
    (e + (c - e) * w) and concatenates them along the tokens; sdtune starts a new chunk per prompt (BREAK) and
    multiplies the prompt's token weights by w (docs/prompts.md says where the two differ)."""
    assert parse_compel('("a cat", "a (dog)2").and(1, 0.5)') == (
        Fragment("a cat", 1.0), Fragment("", 1.0, True), Fragment("a", 0.5), Fragment("dog", 1.0))
    assert parse_compel('("a", "b").add()') == (Fragment("a"), Fragment("", 1.0, True), Fragment("b"))


def test_blend_weights_reach_the_encoder_as_compel_normalises_them():
    assert [w for _, w in parse_compel('("a", "b").blend(0.7, 0.3)').parts] == [
        pytest.approx(0.7), pytest.approx(0.3)]
    raw = parse_compel('("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1,no_normalize)')
    assert isinstance(raw, Blend) and [w for _, w in raw.parts] == [1.0, -1.0]
    assert raw.parts[1][0] == (Fragment("face , teeth ,", 1.0), Fragment("eyes", 0.9 * 0.9))
    # compel would divide by the sum 0 here; sdtune divides by the sum of absolute values
    assert [w for _, w in parse_compel('("a", "b").blend(1, -1)').parts] == [0.5, -0.5]


@pytest.mark.parametrize("text", ["(a " * 3000 + ")" * 3000, '("a" ' * 3000, '"' * 20000, "(" * 20000,
                                  "(a)1.2 " * 3000, '"(' * 3000 + ')"' * 3000, "withLora(" * 5000 + "x)"])
def test_hostile_compel_prompts_stay_fast(text):
    """compel's own parser backtracks exponentially in nesting; sdtune's memoised parser is near-linear and
    groups nested more than 20 deep are text."""
    import time

    start = time.perf_counter()
    try:
        parse_prompt(text, syntax="compel")
    except SdtuneError:
        pass
    assert time.perf_counter() - start < 5


def test_nesting_limit():
    assert parse_compel("(" * 20 + "a" + ")" * 20 + "1.5") == (Fragment("a", 1.5),)
    deep = "(" * 21 + "a" + ")" * 21 + "1.5"
    assert parse_compel(deep) == (Fragment(deep),)


def test_with_lora_generates_the_same_image_as_the_tag(tmp_path):
    """End to end on the tiny model: `withLora(ink, 0.5)` changes the image exactly as `<lora:ink:0.5>` does."""
    import numpy as np
    import torch

    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, random_network
    from sdtune.generate import GenerationParams, Generator
    from sdtune.models.testing import save_tiny_pipeline

    torch.set_num_threads(1)
    pipe = save_tiny_pipeline(tmp_path / "model")
    (tmp_path / "loras").mkdir()
    save_lora(random_network(pipe, unet=KOHYA_UNET, text=TEXT, seed=1, scale=0.5),
              tmp_path / "loras" / "ink.safetensors")
    gen = Generator(str(tmp_path / "model"), lora_dirs=[tmp_path / "loras"])

    def image(prompt: str, syntax: str = "auto") -> np.ndarray:
        params = GenerationParams(prompt=prompt, seed=3, steps=3, width=32, height=32, prompt_syntax=syntax)
        return np.asarray(gen.generate(params)[0].image).astype(np.int32)

    base, tag = image("a red circle"), image("a red circle <lora:ink:0.5>")
    assert np.abs(tag - base).max() > 0
    assert np.array_equal(image("a red circle withLora(ink, 0.5)"), tag)
    assert np.array_equal(image("a red circle useLora(ink, 0.5)", "compel"),
                          image("a red circle <lora:ink:0.5>", "compel"))
