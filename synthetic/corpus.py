"""Built-in training text for the tiny tokenizers.

A few KB of mixed scripts, code, digits and emoji, so that the trained merges exercise every
branch of the published pre-tokenizer regexes (letters, digit runs, punctuation, newlines,
CJK, byte-level fallbacks for emoji). Kept as a plain string so the result is reproducible
without any download.
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
MiniCPM-V is an efficient multimodal language model that runs on phones and laptops.
It reads images of any aspect ratio, slices them into pieces and compresses every slice
into a small number of visual tokens with a perceiver resampler.
Vision encoders such as SigLIP turn 14x14 pixel patches into embeddings; the resampler
attends from learned queries to those embeddings and projects them to the language model.
Please describe this image in detail. What is written on the sign? How many people are there?
The receipt shows 3 items: coffee $4.50, bagel $2.25 and orange juice $3.75, total $10.50.
On 2024-05-20 at 14:35 the temperature was 23.5 degrees Celsius and the humidity 61%.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 4096 65536 3.14159 2.71828 -42 +7 1e-6.
Phone: +1 (555) 010-0199, version v2.6.0, build #8812, ratio 16:9, size 1344x1344.
She said: "I'm sure they'll come, won't they?" He replied, 'We've seen it; you'd agree.'
Contractions: it's, don't, we're, they've, I'm, you'll, he'd, can't, isn't, wasn't.
Lists and punctuation -- dashes, ellipses... (parentheses) [brackets] {braces} <angles>!?
Markdown: # Title\\n## Section\\n- item one\\n- item two\\n**bold** _italic_ `code` > quote
Email me at someone@example.com or visit https://example.org/path?query=1&x=y#frag.

这是一张照片，图片中有一只猫坐在窗台上，窗外阳光明媚。
请详细描述这张图片的内容。图中的文字写的是什么？
多模态大模型可以理解图像、视频和文本，并在手机上高效运行。
今天是二零二四年五月二十日，天气晴朗，气温二十三度。
我们使用视觉编码器提取图像特征，然后通过重采样器压缩为少量的视觉标记。
北京、上海、广州和深圳是中国的大城市。人工智能正在改变世界。
中文分词和英文分词不同，中文没有空格，每个汉字都可能是一个词。
数学题：小明有三个苹果，小红给了他五个，他现在一共有几个苹果？答案是八个。
日本語の文章もあります。これは猫の写真です。東京は日本の首都です。
한국어 문장도 있습니다. 이것은 고양이 사진입니다. 서울은 한국의 수도입니다.
Русский текст: это фотография кошки, которая сидит на подоконнике.
Deutsch: Das Bild zeigt eine Katze auf der Fensterbank. Größe, Straße, Übung.
Français : l'image montre un chat assis près de la fenêtre. Où est-il ? Très bien.
Español: la imagen muestra un gato. ¿Dónde está? ¡Qué bonito! Año, niño, señor.
العربية: هذه صورة قطة تجلس بجانب النافذة.
Emoji: 😀 😃 😄 🐱 🐶 🚀 🌟 ❤️ 👍 🎉 🔥 ✅ 📷 🖼️ 🤖 🇨🇳 🇺🇸 👨‍👩‍👧‍👦

def resample(features, queries, num_heads=8):
    \"\"\"Cross-attend learned queries to vision features.\"\"\"
    batch, length, dim = features.shape
    scores = queries @ features.transpose(-1, -2) / math.sqrt(dim // num_heads)
    weights = torch.softmax(scores, dim=-1)
    return weights @ features

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i, end="\\n")

class Slice:
    def __init__(self, x: int, y: int, w: int = 448, h: int = 448) -> None:
        self.box = (x, y, x + w, y + h)

#include <stdio.h>
int main(void) { for (int i = 0; i < 16; ++i) printf("%d\\n", i * i); return 0; }
const tokens = text.split(/\\s+/).map((t) => t.toLowerCase()).filter(Boolean);
SELECT id, name, price FROM items WHERE price > 10.00 ORDER BY price DESC LIMIT 5;
{"role": "user", "content": "What is in the image?", "images": 1, "ok": true, "score": 0.87}

   Indented text with    several   spaces and\ttabs\tand trailing spaces   
Line one
Line two

Line four after an empty line
The end. Thank you for reading! 谢谢！ありがとう！감사합니다!
"""
