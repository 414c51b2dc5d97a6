"""What post text is made of: words per language, emoji, hashtags, link domains, alt texts, and
the bank of pre-built sentences drawn from them (pure data tables, built once)."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
from typing import Any

from loadtest.firehose.config import ABSENT_WORD, COMMON_WORD, RARE_WORD

_WORDS: dict[str, str] = {
    "en": (
        "the a and to of in is it that this for on with you i my we they just so but not be are "
        "was have at what all like about out up get one time people new day today really think "
        "know good love going make would now still more only very first last night morning week "
        "year game music book movie show art photo news city world government election weather "
        "coffee dog cat friends work home happy sad great best thing things want need feel look "
        "see read write watch play listen again never always maybe here there every someone "
        "everyone nothing because after before while though right left long little big small "
        "old young story song album team season weekend summer winter rain sun sky ocean "
        "mountain garden kitchen dinner lunch breakfast school class paper research data science "
        "history future tomorrow yesterday finally actually literally honestly seriously pretty "
        "much many some any other same different free open close start stop back down over under "
        "through into from by if when how why who where which their them our your his her its ok "
        "yes no lol omg wow thanks please sorry hello vote court policy market price climate "
        "energy bird tree flower river train bike street office meeting deadline draft chapter "
        "painting drawing sketch stream episode trailer concert guitar drums piano"
    ),
    "pt": (
        "eu você não que de e o a é um uma para com mais muito hoje dia gente amor tudo bem "
        "obrigado agora ainda sempre nunca casa trabalho vida mundo coisa tempo ano noite bom boa "
        "feliz saudade música filme livro futebol praia café cidade governo eleição amigos "
        "família pessoas queria acho sei vou tem está foi ser ter fazer ver olha demais né kkkk "
        "aqui lá então porque quando como"
    ),
    "es": (
        "yo tú que de y la el en un una para con más muy hoy día gente amor todo bien gracias "
        "ahora todavía siempre nunca casa trabajo vida mundo cosa tiempo año noche bueno feliz "
        "música película libro fútbol playa café ciudad gobierno elecciones amigos familia "
        "personas quiero creo sé voy tiene está fue ser hacer ver mira jaja aquí allí entonces "
        "porque cuando cómo mañana señor niño"
    ),
    "de": (
        "ich du und der die das ist nicht ein eine mit auf für heute Tag Leute Liebe alles gut "
        "danke jetzt noch immer nie Haus Arbeit Leben Welt Zeit Jahr Nacht schön Musik Film Buch "
        "Fußball Stadt Regierung Wahl Freunde Familie Menschen möchte glaube weiß gehe hat war "
        "sein haben machen sehen schau hier dort dann weil wenn wie Straße Grüße über müssen "
        "können wirklich"
    ),
    "fr": (
        "je tu que de et la le les est pas un une pour avec plus très aujourd'hui jour gens amour "
        "tout bien merci maintenant encore toujours jamais maison travail vie monde chose temps "
        "année nuit bon heureux musique film livre ville gouvernement élection amis famille voir "
        "faire être avoir ici là alors parce quand comment déjà où ça c'est été même"
    ),
    "ru": (
        "я ты и в не на что это как так уже сегодня день люди любовь всё хорошо спасибо сейчас "
        "ещё всегда никогда дом работа жизнь мир время год ночь музыка фильм книга город друзья "
        "семья очень просто когда потому здесь там новый хочу думаю знаю"
    ),
    "tr": (
        "ben sen ve bir bu çok ne için ile gibi ama daha bugün gün insanlar aşk her şey iyi "
        "teşekkürler şimdi hâlâ asla ev iş hayat dünya zaman yıl gece müzik film kitap şehir "
        "hükümet seçim arkadaşlar aile güzel değil var yok oldu"
    ),
    "ko": (
        "나는 너무 오늘 정말 진짜 그리고 하지만 사람들 사랑 모든 좋아요 감사합니다 지금 아직 항상 "
        "집 일 인생 세상 시간 밤 음악 영화 책 도시 친구 가족 보고 싶다 했어요 있어요 없어요 "
        "이쁘시네용 ㅋㅋㅋ ㅠㅠ 같아요 합니다"
    ),
    # Japanese is written without spaces: these are chunks joined directly.
    "ja": (
        "今日は 本当に ちょっと みんな ありがとう 楽しかった 待って 観ようと思ってたのに "
        "知らなかった よかった 明日 仕事 天気 ご飯 美味しい かわいい すごい 疲れた 眠い 音楽 映画 "
        "ゲーム 友達 家族 猫 犬 写真 行ってきた してる です ます けど から ので って ね よ の が を "
        "に で と も は 新しい 絵 描いた 配信 ライブ"
    ),
}
_LANG_WEIGHTS = {
    "en": 0.55,
    "ja": 0.12,
    "pt": 0.10,
    "es": 0.06,
    "de": 0.05,
    "fr": 0.04,
    "ko": 0.03,
    "ru": 0.03,
    "tr": 0.02,
}
_EMOJI = "😂 ❤️ 🥺 ✨ 😭 🙏 👍 🔥 💙 🦋 😍 🎉 👀 😅 🤔 💦 🌸 ☀️ 🙌🏽 👨‍👩‍👧 🏳️‍🌈 🐈".split()  # noqa: SIM905
_HASHTAGS = (  # noqa: SIM905
    "art photography bluesky music books gaming politics science news caturday dogsofbluesky "
    "nature AI writing film football vtuber illustration fediverse OC イラスト 絵描きさんと繋がりたい "
    "사진 Fotografie arte histoire IndieRebellion"
).split()
_LINK_DOMAINS = (
    "www.youtube.com/watch?v=",
    "www.theguardian.com/world/2026/jul/",
    "github.com/",
    "en.wikipedia.org/wiki/",
    "www.nytimes.com/2026/07/",
    "open.spotify.com/track/",
    "www.tumblr.com/",
    "arxiv.org/abs/2607.",
    "www.reuters.com/world/",
    "www.spiegel.de/politik/",
    "g1.globo.com/",
    "elpais.com/",
    "www.nhk.or.jp/news/",
)
_PATH_ALPHABET = "abcdefghikmnoprstuvwABCDEFGHJKLMNPRSTUVW0123456789-_"  # no q, x, j, y, z
_SYLLABLES = [c + v for c in "bdfgklmnprstv" for v in "aeiou"]
_ALT_TEXTS = (
    "",
    "",
    "A photo of a cat sleeping on a windowsill",
    "Screenshot of a news article",
    "Sunset over the sea with orange clouds",
    "Digital drawing of a girl with blue hair",
    "A bowl of ramen on a wooden table",
    "Chart showing rising temperatures since 1950",
)
_TITLES = (
    "What does the anniversary mean to people?",
    "Scientists find new species in the deep sea",
    "Live: election results as they come in",
    "The best albums of the year so far",
    "How to start a garden on a balcony",
)
_DESCRIPTIONS = ("YouTube video by Reuters", "", "Read more on our site.", "An essay in ten parts")


class _Bank:
    """Pre-built sentences per language: (text, utf-8 bytes, graphemes), built once."""

    def __init__(self) -> None:
        rng = random.Random(20260701)
        self.sentences: dict[str, list[tuple[str, int, int]]] = {}
        forbidden = (COMMON_WORD, RARE_WORD, ABSENT_WORD)
        for lang, words_text in _WORDS.items():
            words = words_text.split()
            out: list[tuple[str, int, int]] = []
            for _ in range(600):
                n = rng.randint(1, 4) if rng.random() < 0.3 else rng.randint(3, 14)
                chosen = rng.choices(words, k=n)
                if lang == "ja":
                    text = "".join(chosen) + rng.choice(("。", "！", "…", "w", "", "💦"))
                else:
                    text = " ".join(chosen)
                    text = text[0].upper() + text[1:] + rng.choice((".", "!", "?", "", "...", ","))
                assert not any(f in text.lower() for f in forbidden)
                out.append((text, len(text.encode()), _graphemes(text)))
            self.sentences[lang] = out
        self.langs = list(_LANG_WEIGHTS)
        self.lang_cum = list(_cumulative(_LANG_WEIGHTS.values()))
        self.emoji = [(e, len(e.encode())) for e in _EMOJI]
        self.tags = [(t, len(t.encode()) + 1) for t in _HASHTAGS]


def _graphemes(text: str) -> int:
    """Grapheme count for our vocabulary (no combining marks; each emoji counted once)."""
    count = len(text)
    for emoji in _EMOJI:
        if len(emoji) > 1 and emoji in text:
            count -= text.count(emoji) * (len(emoji) - 1)
    return count


def _cumulative(weights: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


@functools.cache
def _bank() -> _Bank:
    return _Bank()


def _bisect(cum: list[float], x: float) -> int:
    for k, edge in enumerate(cum):
        if x < edge:
            return k
    return len(cum) - 1


class _PostText:
    """A post's text as it grows: pieces joined by `sep`, at most 300 graphemes, and the facets
    of its mentions, links and tags at their UTF-8 byte offsets."""

    def __init__(self, sep: str) -> None:
        self.sep = sep
        self.parts: list[str] = []
        self.facets: list[dict[str, Any]] = []
        self.nbytes = 0
        self.ngraph = 0

    def add(self, text: str, tb: int, tg: int, feature: dict[str, Any] | None = None) -> bool:
        """Append `text` (tb bytes, tg graphemes) unless the post would pass 300 graphemes."""
        gap = 1 if self.parts and self.sep else 0
        if self.ngraph + gap + tg > 300:
            return False
        if gap:
            self.parts.append(self.sep)
        start = self.nbytes + gap
        self.parts.append(text)
        self.nbytes = start + tb
        self.ngraph += gap + tg
        if feature is not None:
            self.facets.append(
                {"features": [feature], "index": {"byteEnd": self.nbytes, "byteStart": start}}
            )
        return True
